"""What a finished run is worth: its best model on the test sets, the intensity metric, the round log.

Predictions and scores are `fer-dist eval`'s and `fer-dist intensity`'s own (`fer_dist.evaluate`), on this
one process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fer_dist import dist
from fer_dist.errors import FerDistError
from fer_dist.evaluate.infer import ShardSplits, predict_shards, read_metadata
from fer_dist.evaluate.intensity import intensity_report, sequence_curves
from fer_dist.evaluate.load import LoadedModel, load_model
from fer_dist.evaluate.report import set_report
from fer_dist.metrics import read_metrics

_ACCELERATOR = None


def _accelerator():
    """One non-distributed Accelerator for the runner's own predictions (made once)."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        _ACCELERATOR = dist.make_accelerator(mixed_precision="no")
    return _ACCELERATOR


def score_set(model: LoadedModel, directory: str, splits: tuple[str, ...]) -> dict[str, Any]:
    """accuracy, macro_f1 (over the classes the set has), uar and n over the set's labelled samples."""
    target = ShardSplits(Path(directory), tuple(splits))
    got = set_report(target, predict_shards(model.net, _accelerator(), target),
                     list(model.net.classes or ()))["all_classes"]
    return {k: got[k] for k in ("accuracy", "macro_f1", "uar", "n")}


def intensity_metric(model: LoadedModel, directory: str, splits: tuple[str, ...]) -> dict[str, Any]:
    """The synthetic set's check of the paper's Figure 1 (`fer-dist intensity`'s score): per sequence,
    Spearman's rho between the predicted probability of the sequence's expression and the true intensity
    of its frames; the mean over sequences, and the mean absolute step between neighbouring frames."""
    target = ShardSplits(Path(directory), tuple(splits))
    pred = predict_shards(model.net, _accelerator(), target)
    report = intensity_report(sequence_curves(pred, read_metadata(target, pred.ids),
                                              list(model.net.classes or ())))
    if report["score_basis"] != "spearman_intensity":
        raise FerDistError(f"{directory}: its sequences carry no true intensity (not the synthetic set)")
    return {"spearman_mean": report["score"], "mean_abs_step": report["overall"]["mean_abs_jump"]["mean"],
            "sequences": report["sequences"]}


def run_record(run_dir: Path) -> dict[str, Any]:
    """What the run itself logged: val accuracy, rounds, per-round confident / drawn / thresholds."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FerDistError(f"{run_dir}: no summary.json: the run has not finished")
    summary = json.loads(summary_path.read_text())
    records = read_metrics(run_dir / "metrics.jsonl")
    rounds = [r for r in records if r.get("kind") == "round"]
    warm = [r["val/acc"] for r in records if r.get("kind") == "warmup"]
    out = {  # accuracies from the log, unrounded (summary.json rounds its figures for people)
        "val_accuracy": max(warm + [r["val/acc"] for r in rounds]), "rounds": summary["rounds"],
        "warmup_epochs": summary["warmup_epochs"], "warmup_best_val": max(warm) if warm else None,
        "stop_reason": summary["stop_reason"],
        "confident_per_round": [r["unlabelled/confident"] for r in rounds],
        "drawn_per_round": [r["unlabelled/drawn"] for r in rounds],
        "val_per_round": [r["val/acc"] for r in rounds],
        "val_per_warmup_epoch": warm,
    }
    if any("unlabelled/thresholds" in r for r in rounds):
        out["thresholds_per_round"] = [r.get("unlabelled/thresholds") for r in rounds]
    # the selection seen against X_u's hidden labels, and the run's own stopping facts (where logged)
    per_round = {"precision_per_round": "unlabelled/precision",
                 "precision_per_class_per_round": "unlabelled/precision_per_class",
                 "confident_per_class_per_round": "unlabelled/confident_per_class",
                 "drawn_per_class_per_round": "unlabelled/class_hist", "reset_per_round": "labelled/reset"}
    for name, key in per_round.items():
        if any(key in r for r in rounds):
            out[name] = [r.get(key) for r in rounds]
    for key in ("warmup_end", "rule_stop_round", "best", "labelled_per_class", "unlabelled_samples",
                "val_samples"):
        if key in summary:
            out[key] = summary[key]
    return out


def load_best(run_dir: Path) -> LoadedModel:
    """The run's best model as exported (best/), on the CPU."""
    if not (run_dir / "best").is_dir():
        raise FerDistError(f"{run_dir}: no best/ model")
    return load_model(run_dir / "best")
