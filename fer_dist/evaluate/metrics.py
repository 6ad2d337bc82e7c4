"""Evaluation metrics as pure NumPy functions: labels and probabilities in, plain dicts out.

Nothing here reads files or knows about processes; `fer_dist.evaluate.report` feeds it gathered
predictions. Conventions: `labels` int [N] in 0..K-1, `probs` float [N, K] rows summing to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ECE_BINS = 15  # the usual choice since Guo et al. (2017), so figures compare with the literature


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] counts: row = true class, column = predicted class."""
    labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    return np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int,
                           classes: Sequence[int] | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1, unweighted average recall (UAR), per-class precision / recall / F1 / support.

    Macro averages run over `classes` (default: the classes present in `labels`): a class with no test
    sample has no recall to average, and counting it as 0 would punish a model for the test set's gaps.
    """
    labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    cm = confusion_matrix(labels, preds, num_classes)
    support, predicted, hits = cm.sum(1), cm.sum(0), np.diag(cm)
    precision, recall = _safe_div(hits, predicted), _safe_div(hits, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    over = np.array(sorted(classes) if classes is not None else np.flatnonzero(support), dtype=np.int64)
    return {
        "n": int(labels.size),
        "accuracy": float(hits.sum() / labels.size) if labels.size else float("nan"),
        "macro_f1": float(f1[over].mean()) if over.size else float("nan"),
        "uar": float(recall[over].mean()) if over.size else float("nan"),
        "per_class": {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                      "support": support.tolist()},
        "confusion": cm.tolist(),
    }


def restrict(probs: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Probabilities renormalised over `classes` (0 elsewhere): the model's choice among those classes."""
    keep = np.zeros(probs.shape[1], dtype=bool)
    keep[list(classes)] = True
    out = np.where(keep, probs, 0.0)
    total = out.sum(1, keepdims=True)
    return np.divide(out, total, out=np.full_like(out, 1.0 / keep.sum()) * keep, where=total > 0)


def calibration(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """Expected calibration error over equal-width confidence bins, and the bins for a reliability diagram.

    ECE = sum over bins of (bin size / N) * |accuracy in bin - mean confidence in bin| (top-1 confidence).
    """
    labels = np.asarray(labels, np.int64)
    conf, preds = probs.max(1), probs.argmax(1)
    correct = (preds == labels).astype(np.float64)
    # bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 cannot occur for argmax
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    mean_conf = _safe_div(np.bincount(which, conf, bins), count)
    mean_acc = _safe_div(np.bincount(which, correct, bins), count)
    ece = float((count / max(1, labels.size) * np.abs(mean_acc - mean_conf)).sum())
    return {
        "ece": ece, "bins": bins,
        "mean_confidence": float(conf.mean()) if conf.size else float("nan"),
        "bin_count": count.tolist(), "bin_confidence": mean_conf.tolist(), "bin_accuracy": mean_acc.tolist(),
    }


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..N with ties given their average rank (scipy.stats.rankdata's 'average')."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, np.float64)
    sorted_x = x[order]
    # runs of equal values share the mean of the positions they span
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    mean_rank = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); nan when either side is constant."""
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def mean_abs_jump(curve: np.ndarray) -> float:
    """Mean |p[t+1] - p[t]| along one sequence: how jumpy a model's grading of intensity is."""
    curve = np.asarray(curve, np.float64)
    return float(np.abs(np.diff(curve)).mean()) if curve.size > 1 else float("nan")


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if not v.size:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}
