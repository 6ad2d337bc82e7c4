"""`fer-dist intensity`: how well a model grades expression intensity along sequences (the paper's Figure 1).

For every sequence of a known expression (CK+, the synthetic set: metadata `sequence`, `frame`, `seq_len`,
`expression`), the probability of that expression frame by frame. A model that grades intensity gives a
curve that rises from the neutral first frame to the peak: its Spearman correlation with the frame's
position (and with the true intensity, where the data has it: the synthetic set) is near 1, and its mean
absolute jump between consecutive frames is small. The score that compares models is the mean Spearman
correlation with the true intensity where every sequence has it, else with the position.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from fer_dist.classes import NEUTRAL
from fer_dist.errors import FerDistError
from fer_dist.evaluate import metrics
from fer_dist.evaluate.infer import Predictions

GRID_SEQUENCES = 24  # curves drawn; every sequence is measured


def sequence_curves(pred: Predictions, meta: list[dict], class_names: list[str]) -> list[dict[str, Any]]:
    """One curve per non-neutral sequence with at least two frames, in sequence order."""
    frames: dict[str, list[tuple[int, int, dict]]] = defaultdict(list)
    for row, m in enumerate(meta):
        if "sequence" in m and "frame" in m and isinstance(m.get("expression"), int):
            frames[str(m["sequence"])].append((int(m["frame"]), row, m))
    curves = []
    for name in sorted(frames):
        items = sorted(frames[name], key=lambda t: t[0])
        expression = items[0][2]["expression"]
        if expression == NEUTRAL or len(items) < 2:
            continue  # a neutral "sequence" has no intensity to grade
        last = max(int(items[0][2].get("seq_len", items[-1][0] + 1)) - 1, 1)
        rows = [row for _, row, _ in items]
        intensity = [m.get("intensity") for _, _, m in items]
        curves.append({
            "sequence": name, "class": class_names[expression], "frames": [f for f, _, _ in items],
            "position": [f / last for f, _, _ in items],
            "prob": pred.probs[rows, expression].tolist(),
            "intensity": intensity if all(isinstance(v, (int, float)) for v in intensity) else None,
        })
    return curves


def curve_scores(curve: dict[str, Any]) -> dict[str, float]:
    """Spearman with position and with true intensity (nan where absent), mean absolute jump."""
    prob = np.asarray(curve["prob"])
    truth = curve["intensity"]
    return {"spearman_position": metrics.spearman(curve["position"], prob),
            "spearman_intensity": metrics.spearman(truth, prob) if truth is not None else float("nan"),
            "mean_abs_jump": metrics.mean_abs_jump(prob)}


def intensity_report(curves: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-sequence scores, their means per class and overall, and the one score that compares models."""
    if not curves:
        raise FerDistError("intensity: the shards hold no sequence of a known expression (metadata "
                           "'sequence', 'frame' and 'expression': the synthetic set, CK+'s official layout)")
    for curve in curves:
        curve.update(curve_scores(curve))
    keys = ("spearman_position", "spearman_intensity", "mean_abs_jump")
    overall = {k: metrics.mean_std([c[k] for c in curves]) for k in keys}
    by_class: dict[str, dict[str, Any]] = {}
    for name in sorted({c["class"] for c in curves}):
        mine = [c for c in curves if c["class"] == name]
        by_class[name] = {"sequences": len(mine), **{k: metrics.mean_std([c[k] for c in mine])["mean"]
                                                       for k in keys}}
    with_truth = all(c["intensity"] is not None for c in curves)
    basis = "spearman_intensity" if with_truth else "spearman_position"
    return {"sequences": len(curves), "score": overall[basis]["mean"], "score_basis": basis,
            "overall": overall, "by_class": by_class, "curves": curves}


def grid_sample(curves: list[dict[str, Any]], limit: int = GRID_SEQUENCES) -> list[dict[str, Any]]:
    """Up to `limit` curves for the picture, taken round-robin over the classes so each class shows."""
    by_class: dict[str, list[dict]] = defaultdict(list)
    for c in curves:
        by_class[c["class"]].append(c)
    out: list[dict] = []
    while len(out) < limit and any(by_class.values()):
        for name in sorted(by_class):
            if by_class[name] and len(out) < limit:
                out.append(by_class[name].pop(0))
    return out
