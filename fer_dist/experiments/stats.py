"""The few statistics RESULTS.md prints: mean and spread over seeds, paired gains, their 95 % t interval,
plain-word verdicts, and the power of the paired t-test (NumPy and the standard library only)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

import numpy as np

# No interval, verdict or power is printed from fewer paired seeds (an interval at n = 2 spans -7 to +7).
MIN_SEEDS = 3
POWER_GAIN = 2.0  # the gain (points) whose detection power RESULTS.md states
# Two-sided 95 % quantiles of Student's t for 1..10 degrees of freedom; beyond, 1.96 + 2.5/df is within 0.01.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pct(values: list[float]) -> str:
    """Fractions as `mean ± sd` in points (the mean alone for one value)."""
    m, s = mean_sd([100 * v for v in values])
    return f"{m:.2f} ± {s:.2f}" if len(values) > 1 else f"{m:.2f}"


def t975(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with `df` degrees of freedom."""
    return T975[df - 1] if df <= len(T975) else 1.96 + 2.5 / df


def paired_gain(arm: list[dict[str, Any]], ref: list[dict[str, Any]],
                value: Callable[[dict[str, Any]], float] = lambda r: 100 * r["test_accuracy"],
                pair: Callable[[dict[str, Any], dict[str, Any]], bool] | None = None,
                ) -> tuple[list[float], list[int]]:
    """Arm minus reference over the seeds both have from one start (`pair`, default `same_start`; value,
    default: test accuracy in points)."""
    pair = pair or same_start
    pairs = [(r, q) for r in arm for q in ref if q["seed"] == r["seed"] and pair(r, q)]
    return [value(r) - value(q) for r, q in pairs], [r["seed"] for r, _ in pairs]


def same_start(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two records of one seed started their rounds from one warm-up. Where both started from a
    shared warm-up (`warmup_run`), its validation curve, which both carry, tells: the warm-up trained again
    (its run folder lost, another CPU's arithmetic) gives another curve, and arms of the two do not pair."""
    if "warmup_run" not in a or "warmup_run" not in b:
        return True
    return a.get("val_per_warmup_epoch") == b.get("val_per_warmup_epoch")


def same_data(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two records of one seed, of two experiments, trained on one X_l. A labelled share's subset is
    drawn from the seed, the share and the face ids alone (data.runset.share_mask), whatever the backbone;
    records carry no list of faces, so equal class counts are the check that catches another share or
    shard folder."""
    return a.get("labelled_per_class") is not None and a.get("labelled_per_class") == b.get(
        "labelled_per_class")


def interval(values: list[float]) -> tuple[float, float]:
    """The 95 % t interval of the mean (at least two values)."""
    m, s = mean_sd(values)
    half = t975(len(values) - 1) * s / len(values) ** 0.5
    return m - half, m + half


def verdict(gains: list[float], unit: str = " points", digits: int = 2) -> str:
    """Plain words for a paired gain: a sign only where the 95 % interval of its mean excludes 0, and an
    interval only from MIN_SEEDS pairs up."""
    m, s = mean_sd(gains)
    f = f"+.{digits}f"
    seeds = ", ".join(f"{g:{f}}" for g in gains)
    if len(gains) < 2:
        return f"{m:{f}}{unit} from one seed: no spread to judge it by"
    if len(gains) < MIN_SEEDS:
        return (f"{m:{f}}{unit} over {len(gains)} paired seeds (per seed {seeds}): too few seeds for an "
                f"interval ({MIN_SEEDS} or more), no reading")
    lo, hi = interval(gains)
    word = ("a gain" if m > 0 else "a loss") if lo > 0 or hi < 0 else "not distinguishable from seed noise"
    return (f"{m:{f}} ± {s:.{digits}f}{unit} over {len(gains)} paired seeds ({word}; per seed "
            f"{seeds}; 95 % interval {lo:{f}} to {hi:{f}})")


def paper_side(gains: list[float], paper: float) -> str:
    """Where the paper's gain lies against our interval: inside, above or below (MIN_SEEDS pairs or more)."""
    lo, hi = interval(gains)
    return "inside" if lo <= paper <= hi else ("above" if paper > hi else "below")


def against_paper(gains: list[float], paper: float) -> str:
    """The paper's gain against ours: where it lies against our interval, or that there is no reading."""
    if len(gains) < MIN_SEEDS:
        return f"the paper reports {paper:+.1f} points; under {MIN_SEEDS} seeds give no reading against it"
    return f"the paper reports {paper:+.1f} points, {paper_side(gains, paper)} our interval"


def _nct_cdf(x: float, df: int, ncp: float) -> float:
    """P(T <= x) for the noncentral t, T = (Z + ncp) / (U / sqrt(df)) with U ~ chi(df): the mean over U of
    Phi(x U / sqrt(df) - ncp), integrated on a grid (U's density is negligible past sqrt(df) + 12)."""
    u = np.linspace(0.0, math.sqrt(df) + 12.0, 8001)
    log_f = (df - 1) * np.log(np.maximum(u, 1e-300)) - u * u / 2 - (df / 2 - 1) * math.log(2) \
        - math.lgamma(df / 2)
    phi = 0.5 * (1 + np.vectorize(math.erf)((x * u / math.sqrt(df) - ncp) / math.sqrt(2)))
    y = np.exp(log_f) * phi
    return float(((y[1:] + y[:-1]) / 2 * np.diff(u)).sum())  # the trapezoid rule (numpy 1.x and 2.x)


def power(gain: float, sd: float, n: int) -> float:
    """Power of the two-sided paired t-test at 5 % to detect a true mean gain `gain` from n pairs whose
    differences spread with standard deviation `sd`: P(|T| > t_{0.975, n-1}), T noncentral t with n - 1
    degrees of freedom and noncentrality gain * sqrt(n) / sd."""
    df, ncp = n - 1, gain * math.sqrt(n) / sd
    crit = t975(df)
    return 1 - _nct_cdf(crit, df, ncp) + _nct_cdf(-crit, df, ncp)


def power_note(gains: list[float]) -> str:
    """The power for a POWER_GAIN-point gain at the measured spread, with these seeds and with 5."""
    if len(gains) < MIN_SEEDS or mean_sd(gains)[1] == 0:
        return ""
    sd, n = mean_sd(gains)[1], len(gains)
    at = [n] + ([5] if n != 5 else [])
    return (f"; power for a {POWER_GAIN:g}-point gain at this spread (sd {sd:.2f}): "
            + ", ".join(f"{_percent(power(POWER_GAIN, sd, k))} with {k} seeds" for k in at))


def _percent(p: float) -> str:
    return "> 99 %" if p > 0.995 else f"{100 * p:.0f} %"


def gain_cell(gains: list[float]) -> str:
    """A paired gain for a table: its interval from MIN_SEEDS seeds up, else the count of seeds."""
    if not gains:
        return "-"
    m = statistics.fmean(gains)
    if len(gains) < MIN_SEEDS:
        return f"{m:+.2f} ({len(gains)} seed{'s' * (len(gains) > 1)}, no interval)"
    lo, hi = interval(gains)
    return f"{m:+.2f} ({lo:+.2f} to {hi:+.2f})"
