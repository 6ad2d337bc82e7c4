"""What an arm's rounds did, read from its records: how many unlabelled faces passed the threshold (U_t), how
often their pseudo-labels were right against the hidden labels (overall and per class), which classes were
drawn into the rounds against the labelled set's shares, and how many labelled targets the alpha rule reset.
RESULTS.md prints it beside the gains, so that a gain, or its absence, comes with what the selection did;
the arm table's per-round cells and the reading's round figures come from here too.

Pooled over seeds and rounds, each round weighted by its faces: a precision is correct faces / selected
faces over all rounds, not a mean of per-round precisions (a round of 3 faces counts for 3 faces).
"""

from __future__ import annotations

import statistics
from typing import Any

from fer_dist.classes import CLASSES

EDGE = 5  # rounds at each end whose precision is set side by side: does the selection drift?


def _pooled(values: list[float | None], weights: list[int]) -> tuple[float, int]:
    """(sum of value x weight, sum of weights) over the entries that have both."""
    pairs = [(v, w) for v, w in zip(values, weights, strict=False) if v is not None and w]
    return sum(v * w for v, w in pairs), sum(w for _, w in pairs)


def precision(rows: list[dict[str, Any]], rounds: slice = slice(None)) -> float | None:
    """The share of U_t's faces whose pseudo-label was right, over the rounds (all) of every record."""
    correct, total = 0.0, 0
    for r in rows:
        c, n = _pooled((r.get("precision_per_round") or [])[rounds], r["confident_per_round"][rounds])
        correct, total = correct + c, total + n
    return correct / total if total else None


def class_precision(rows: list[dict[str, Any]]) -> list[float | None]:
    """Per class, the share of U_t's faces of that pseudo-class whose label was right (None: none entered)."""
    out = []
    for k in range(len(CLASSES)):
        correct, total = 0.0, 0
        for r in rows:
            per_round = zip(r.get("precision_per_class_per_round") or [],
                            r.get("confident_per_class_per_round") or [], strict=False)
            for prec, count in per_round:
                c, n = _pooled([prec[k]], [count[k]])
                correct, total = correct + c, total + n
        out.append(correct / total if total else None)
    return out


def shares(counts: list[list[int]]) -> list[float]:
    """Per class, its share of the summed counts (each entry one per-class list)."""
    totals = [sum(c[k] for c in counts) for k in range(len(CLASSES))]
    whole = sum(totals)
    return [t / whole if whole else 0.0 for t in totals]


def arm_lines(arm: str, rows: list[dict[str, Any]]) -> list[str]:
    """The arm's diagnostics, one bullet; none where its rounds selected nothing and reset nothing."""
    rounds = sum(len(r["confident_per_round"]) for r in rows)
    resets = [r["reset_per_round"] for r in rows if r.get("reset_per_round")]
    confident = sum(sum(r["confident_per_round"]) for r in rows)
    if not rounds or not (confident or any(map(any, resets))):
        return []
    seeds = f"{len(rows)} seed{'s' * (len(rows) != 1)}, {rounds} rounds in all"
    parts = []
    if confident:
        per_round = confident / rounds
        pools = [r["unlabelled_samples"] for r in rows if r.get("unlabelled_samples")]
        pool = sum(pools) / len(pools) if len(pools) == len(rows) else 0  # older records lack the size
        share = f" ({100 * per_round / pool:.0f} % of X_u's {pool:,.0f})" if pool else ""
        drawn = sum(sum(r["drawn_per_round"]) for r in rows) / rounds
        parts.append(f"U_t held {per_round:,.0f} faces a round{share}, {drawn:,.0f} of them drawn")
        prec = precision(rows)
        if prec is not None:
            by_seed = [p for p in (precision([r]) for r in rows) if p is not None]
            low, high = min(by_seed), max(by_seed)
            spread = f" (by seed {100 * low:.1f}-{100 * high:.1f} %)" if len(by_seed) > 1 else ""
            parts.append(f"their pseudo-labels {100 * prec:.1f} % right{spread}")
            first, last = precision(rows, slice(None, EDGE)), precision(rows, slice(-EDGE, None))
            if min(len(r["confident_per_round"]) for r in rows) >= 2 * EDGE and None not in (first, last):
                parts[-1] += (f", {100 * first:.0f} % in the first {EDGE} rounds, {100 * last:.0f} % in the "
                              f"last {EDGE}")
        drawn_by_class = [c for r in rows for c in r.get("drawn_per_class_per_round") or []]
        labelled = [r["labelled_per_class"] for r in rows if r.get("labelled_per_class")]
        if drawn_by_class and labelled:
            got, base = shares(drawn_by_class), shares(labelled)
            order = sorted(range(len(CLASSES)), key=lambda k: -got[k])
            parts.append("drawn by class (X_l's share in brackets): " + ", ".join(
                f"{CLASSES[k]} {100 * got[k]:.0f} % ({100 * base[k]:.0f} %)" for k in order))
        by_class = class_precision(rows)
        if any(p is not None for p in by_class):
            parts.append("pseudo-label precision by class: " + ", ".join(
                f"{CLASSES[k]} {'-' if p is None else f'{100 * p:.0f} %'}" for k, p in enumerate(by_class)))
    if any(map(any, resets)):
        labelled_size = [sum(r["labelled_per_class"]) for r in rows if r.get("reset_per_round")
                         and r.get("labelled_per_class")]
        mean_reset = sum(map(sum, resets)) / sum(map(len, resets))
        of = (f" ({100 * mean_reset / (sum(labelled_size) / len(labelled_size)):.0f} % of X_l)"
              if labelled_size else "")
        parts.append(f"the alpha rule reset {mean_reset:,.0f} labelled targets a round{of}")
    return [f"- {arm} ({seeds}): " + "; ".join(parts) + "."]


def per_round(counts: list[int]) -> str:
    """A seed's per-round counts in a table cell: all of them up to 5 rounds, else first -> last and the
    range (the rounds figure draws every round)."""
    if not counts:
        return "-"
    if len(counts) <= 5:
        return " ".join(map(str, counts))
    if len(set(counts)) == 1:
        return f"{counts[0]} (all {len(counts)})"
    return f"{counts[0]} -> {counts[-1]} ({min(counts)}-{max(counts)})"


def shrinking(rows: list[dict[str, Any]]) -> bool:
    """Whether the confident count of the last round is below the first's, on average over seeds."""
    runs = [r["confident_per_round"] for r in rows if len(r["confident_per_round"]) > 1]
    return bool(runs) and statistics.fmean(c[-1] - c[0] for c in runs) < 0


def last_round(rows: list[dict[str, Any]], key: str) -> float:
    """The mean over seeds of a per-round list's last value (thresholds: their mean over classes)."""
    last = [r[key][-1] for r in rows if r.get(key)]
    return statistics.fmean(statistics.fmean(v) if isinstance(v, list) else v for v in last) if last else 0.0


def selection(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """RESULTS.md's "What the rounds did" block for an experiment's arms (empty where no arm selected or reset
    anything, or the records predate these counts)."""
    lines = [line for arm, rows in groups.items() for line in arm_lines(arm, rows)]
    if not lines:
        return []
    return ["What the rounds did (pooled over seeds and rounds, each round weighted by its faces):", "",
            *lines, ""]
