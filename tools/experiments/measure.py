"""What a finished run is worth: its best model on the test sets, the intensity metric, the round log.

A small prediction helper over the project's public pieces (exported model, exhaustive stream, labels),
one process; the metrics are `fer_dist.evaluate.metrics.classification_metrics`, the function
`fer-dist eval` reports with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fer_dist.classes import NUM_CLASSES
from fer_dist.data.augment import eval_transform
from fer_dist.data.shardread import read_samples
from fer_dist.data.stream import ShardSet, exhaustive_loader, read_labels
from fer_dist.errors import FerDistError
from fer_dist.metrics import read_metrics
from fer_dist.models import load_exported


@torch.no_grad()
def predict_set(net: torch.nn.Module, directory: str, splits: tuple[str, ...], batch_size: int = 256
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, ShardSet]:
    """(ids, labels (-1 unlabelled), probs [N, K]) of every sample of the splits, in id order."""
    shardset = ShardSet([(directory, list(splits))])
    labels = read_labels(shardset)
    net.eval()
    stream = exhaustive_loader(shardset.shards(0), None, transform=eval_transform(net.input_spec),
                               batch_size=batch_size, rank=0, world=1, num_workers=0)
    ids, probs = [np.zeros(0, np.int64)], [np.zeros((0, NUM_CLASSES), np.float32)]
    for images, _labels, batch_ids in stream:
        probs.append(torch.softmax(net(images).float(), dim=1).numpy())
        ids.append(batch_ids.numpy())
    all_ids = np.concatenate(ids)
    order = np.argsort(all_ids, kind="stable")
    return all_ids[order], labels.numpy()[all_ids[order]], np.concatenate(probs)[order], shardset


def score_set(net: torch.nn.Module, directory: str, splits: tuple[str, ...]) -> dict[str, Any]:
    """accuracy, macro_f1 (over the classes the set has), uar and n over the set's labelled samples."""
    from fer_dist.evaluate.metrics import classification_metrics

    _, labels, probs, _ = predict_set(net, directory, splits)
    keep = labels >= 0
    if not keep.any():
        raise FerDistError(f"{directory}:{','.join(splits)}: no labelled sample to test on")
    got = classification_metrics(labels[keep], probs[keep].argmax(1), NUM_CLASSES)
    return {k: got[k] for k in ("accuracy", "macro_f1", "uar")} | {"n": int(keep.sum())}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (what Spearman's rho needs)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation; nan where either side is constant."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def intensity_metric(net: torch.nn.Module, directory: str, splits: tuple[str, ...]) -> dict[str, Any]:
    """The synthetic set's check of the paper's Figure 1: per sequence, Spearman's rho between the
    predicted probability of the sequence's expression and the true intensity of its frames (0 -> 1);
    the mean over sequences, and the mean absolute step of that probability between neighbouring frames
    (small: a smooth rise; a jump from 0 to 1 in one frame of n gives about 1 / (n - 1))."""
    ids, _, probs, shardset = predict_set(net, directory, splits)
    position = {int(i): row for row, i in enumerate(ids)}
    seqs: dict[str, list[tuple[float, float]]] = {}
    for shard in shardset.shards(0):
        keys = np.arange(shard.count, dtype=np.int64) + (shard.first_run_id - shard.offset)
        for key, members in read_samples(shard.index(), keys, ("json",)):
            meta = json.loads(members["json"])
            if "intensity" not in meta or "expression" not in meta:
                raise FerDistError(f"{shard.path}: sample {key} has no true intensity "
                                   "(not the synthetic set)")
            p = float(probs[position[shard.offset + key], int(meta["expression"])])
            seqs.setdefault(meta["sequence"], []).append((float(meta["intensity"]), p))
    rhos, steps = [], []
    for frames in seqs.values():
        frames.sort()
        truth, p = np.array([f[0] for f in frames]), np.array([f[1] for f in frames])
        rho = spearman(truth, p)
        if not np.isnan(rho):
            rhos.append(rho)
        steps.append(float(np.abs(np.diff(p)).mean()) if len(p) > 1 else 0.0)
    return {"spearman_mean": float(np.mean(rhos)) if rhos else float("nan"),
            "mean_abs_step": float(np.mean(steps)) if steps else float("nan"), "sequences": len(seqs)}


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
    }
    if any("unlabelled/thresholds" in r for r in rounds):
        out["thresholds_per_round"] = [r.get("unlabelled/thresholds") for r in rounds]
    return out


def load_best(run_dir: Path) -> torch.nn.Module:
    """The run's best model as exported (best/), on the CPU."""
    if not (run_dir / "best").is_dir():
        raise FerDistError(f"{run_dir}: no best/ model")
    return load_exported(run_dir / "best")
