"""The experiment pictures (matplotlib, Agg): per experiment, what the rounds selected and how much of it
was right; per curve, test accuracy against the labelled share. Pure of records: they draw what they get."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fer_dist.evaluate.plots import plt, save
from fer_dist.experiments.stats import MIN_SEEDS, interval, mean_sd


def _per_round_mean(rows: list[dict[str, Any]], key: str) -> list[float]:
    """Round by round, the mean over the seeds that have a value there (None entries skipped)."""
    runs = [[v for v in r.get(key) or []] for r in rows]
    out = []
    for i in range(max((len(x) for x in runs), default=0)):
        got = [x[i] for x in runs if i < len(x) and x[i] is not None]
        out.append(sum(got) / len(got) if got else float("nan"))
    return out


def rounds(groups: dict[str, list[dict[str, Any]]], title: str, path: Path) -> Path | None:
    """Selected (confident) unlabelled faces and their precision against the hidden labels, per round, per
    arm (mean over seeds), of the arms that selected any; None where none did (a supervised arm's rounds
    select nothing: its counts are all 0)."""
    arms = {arm: rows for arm, rows in groups.items() if any(any(r["confident_per_round"]) for r in rows)}
    if not arms:
        return None
    fig, (count_ax, prec_ax) = plt.subplots(1, 2, figsize=(11, 4))
    precision = False
    for arm, rows in arms.items():
        xs = range(1, 1 + len(conf := _per_round_mean(rows, "confident_per_round")))
        line = count_ax.plot(xs, conf, marker=".", label=f"{arm} ({len(rows)} seed{'s' * (len(rows) > 1)})")
        prec = _per_round_mean(rows, "precision_per_round")
        if prec:
            precision = True
            prec_ax.plot(range(1, 1 + len(prec)), [100 * p for p in prec], marker=".",
                         color=line[0].get_color(), label=arm)
    for ax in (count_ax, prec_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)  # rounds are whole numbers
    count_ax.set(xlabel="round", ylabel="selected unlabelled faces (U_t)", title="selected per round")
    count_ax.legend(fontsize=8)
    prec_ax.set(xlabel="round", ylabel="precision of U_t's pseudo-labels %", title="pseudo-label precision")
    if precision:
        prec_ax.legend(fontsize=8)
    else:
        prec_ax.text(0.5, 0.5, "not recorded (records made before\nthe precision was logged)",
                     ha="center", va="center", transform=prec_ax.transAxes)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(fig, path)


def curve(points: dict[str, list[tuple[float, list[float]]]], title: str, path: Path) -> Path | None:
    """Test accuracy % against the labelled share %, per arm: the mean over seeds, with its 95 % t interval
    where MIN_SEEDS seeds or more were recorded. `points`: arm -> [(share, accuracies in points)]."""
    if not any(accs for pts in points.values() for _, accs in pts):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for k, (arm, pts) in enumerate(points.items()):
        pts = sorted((share, accs) for share, accs in pts if accs)
        xs = [100 * share * (1 + 0.02 * (k - len(points) / 2)) for share, _ in pts]  # apart, not hidden
        means = [mean_sd(accs)[0] for _, accs in pts]
        half = [m - interval(accs)[0] if len(accs) >= MIN_SEEDS else 0.0
                for m, (_, accs) in zip(means, pts, strict=True)]
        ax.errorbar(xs, means, yerr=[half, half], marker="o", capsize=3, label=arm)
    ax.set_xscale("log")
    shares = sorted({100 * s for pts in points.values() for s, accs in pts if accs})
    ax.set_xticks(shares, [f"{s:g} %" for s in shares])
    ax.minorticks_off()
    ax.set(xlabel="labelled share of the training split", ylabel="test accuracy %", title=title)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(fig, path)
