"""`fer-dist eval`: a model's metrics on one or more test sets, as JSON, pictures and one table.

A test set that lacks some of the seven classes (CK+48 has no neutral) is reported two ways, each
labelled: over all seven outputs (the model may answer a class the set does not have), and restricted to
the classes present (the probabilities renormalised over those classes). Macro averages run over the
classes present in both.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from fer_dist.errors import FerDistError
from fer_dist.evaluate import metrics, plots
from fer_dist.evaluate.infer import Predictions, ShardSplits, predict_shards, tta_words
from fer_dist.evaluate.load import LoadedModel
from fer_dist.outputs import written_folder

RESULTS_FILE = "eval.json"
FORMAT = "fer-dist-eval/1"


def file_stem(name: str) -> str:
    """A set's name as a file name part (`ckplus48:test` -> `ckplus48_test`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _scored(labels: np.ndarray, probs: np.ndarray, classes: list[int], num_classes: int) -> dict[str, Any]:
    out = metrics.classification_metrics(labels, probs.argmax(1), num_classes, classes=classes)
    out["calibration"] = metrics.calibration(labels, probs)
    return out


def set_report(target: ShardSplits, pred: Predictions, class_names: list[str]) -> dict[str, Any]:
    """All of one set's figures from its gathered predictions."""
    keep = pred.labels >= 0
    if not keep.any():
        raise FerDistError(f"--shards {target.dir}:{','.join(target.splits)}: no labelled sample to evaluate")
    labels, probs = pred.labels[keep], pred.probs[keep]
    k = probs.shape[1]
    present = sorted(int(c) for c in np.unique(labels))
    record = {
        "name": target.name, "dir": str(target.dir), "splits": list(target.splits),
        "dataset": pred.manifest.dataset, "n": int(labels.size), "unlabelled_left_out": int((~keep).sum()),
        "classes_present": [class_names[c] for c in present], "input": pred.adapted,
        "all_classes": _scored(labels, probs, present, k),
        "present_classes": None,
    }
    if len(present) < k:
        record["present_classes"] = _scored(labels, metrics.restrict(probs, present), present, k)
    return record


def evaluate(loaded: LoadedModel, targets: list[ShardSplits], acc, *, tta: str = "none",
             batch_size: int = 256, num_workers: int = 0) -> dict[str, Any]:
    """Every set predicted (all processes take part) and scored; the same dict on every process."""
    if not targets:
        raise FerDistError("--shards: name at least one test set (DIR or DIR:split)")
    names = list(loaded.net.classes or [str(i) for i in range(loaded.net.spec.num_classes)])
    sets = []
    for target in targets:
        pred = predict_shards(loaded.net, acc, target, tta=tta, batch_size=batch_size,
                              num_workers=num_workers)
        sets.append(set_report(target, pred, names))
    return {"format": FORMAT, "model": str(loaded.path), "model_name": loaded.name, "classes": names,
            "tta": tta, "tta_words": tta_words(tta), "sets": sets}


def write_report(results: dict[str, Any], out: Path, *, overwrite: bool = False, about: str = "") -> Path:
    """`out`/eval.json, a confusion matrix and a reliability diagram per set, put in place together; an
    existing `out` only with `overwrite`, and only an earlier eval output (`fer_dist.outputs`)."""
    with written_folder(out, "eval", overwrite=overwrite, about=about) as tmp:
        for record in results["sets"]:
            stem = file_stem(record["name"])
            files = {}
            for how in ("all_classes", "present_classes"):
                scored = record[how]
                if scored is None:
                    continue
                tag = "" if how == "all_classes" else "-present"
                title = (f"{results['model_name']} on {record['name']} ({how.replace('_', ' ')}; "
                         f"{results['tta_words']})")
                files[f"confusion{tag}"] = plots.confusion(
                    np.asarray(scored["confusion"]), results["classes"], title,
                    tmp / f"confusion-{stem}{tag}.png").name
                files[f"reliability{tag}"] = plots.reliability(
                    scored["calibration"], title, tmp / f"reliability-{stem}{tag}.png").name
            record["files"] = files
        (tmp / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return out / RESULTS_FILE


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per set and way of counting: the cross-database table."""
    rows = []
    for record in results["sets"]:
        for how, label in (("all_classes", "all 7 outputs"), ("present_classes", "classes present")):
            s = record[how]
            if s is None:
                continue
            rows.append([record["name"], label, str(s["n"]), f"{s['accuracy']:.4f}", f"{s['macro_f1']:.4f}",
                         f"{s['uar']:.4f}", f"{s['calibration']['ece']:.4f}"])
    return rows


TABLE_COLUMNS = ["test set", "counted over", "n", "accuracy", "macro-F1", "UAR", "ECE"]
