"""`fer-dist cv --config ... --folds K`: K-fold cross-validation over the fold ids the shards carry.

Fold k: the test set is fold k, validation fold (k + 1) mod K, training (labelled and unlabelled) the
other K - 2, in every shard directory of the config that was sharded with `--folds K`; directories
without folds (extra unlabelled data) are used as configured. Each fold is a full training run
(`<name>-fold<k>`, launched like `fer-dist train`, one after another with the same Accelerate options),
then its best model is evaluated on its test fold. A fold whose run has finished is not run again and an
interrupted one resumes from its checkpoint, so the same command continues an interrupted
cross-validation. The mean and standard deviation per metric go to `<run.dir>/<name>-cv/cv.json`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from fer_dist.config import ShardsRef, TrainConfig
from fer_dist.data.manifest import read_manifest
from fer_dist.errors import FerDistError
from fer_dist.evaluate import metrics
from fer_dist.evaluate.infer import ShardSplits
from fer_dist.outputs import written_folder

FORMAT = "fer-dist-cv/1"
METRICS = ("accuracy", "macro_f1", "uar", "ece", "best_val")


def fold_roles(k: int, folds: int) -> dict[str, list[int]]:
    """Which fold ids fold k trains, validates and tests on."""
    if folds < 3:
        raise FerDistError(f"--folds: {folds} leaves no training fold besides the test and validation "
                           "folds; use 3 or more")
    if not 0 <= k < folds:
        raise FerDistError(f"fold {k} is not one of 0..{folds - 1}")
    val = (k + 1) % folds
    return {"train": [f for f in range(folds) if f not in (k, val)], "val": [val], "test": [k]}


def _folded(ref: ShardsRef, folds: int) -> bool:
    """Whether `ref`'s directory was sharded with `--folds folds` (another K is an error)."""
    have = read_manifest(Path(ref.dir)).folds
    if have is not None and have != folds:
        raise FerDistError(f"{ref.dir}: sharded with --folds {have}, not {folds}")
    return have is not None


def fold_data(cfg: TrainConfig, k: int, folds: int) -> dict[str, list[dict[str, Any]]]:
    """The `data.*` lists of fold k: the labelled directories' folds as train / val / test."""
    roles = fold_roles(k, folds)
    labelled = [ref for ref in cfg.data.labelled if _folded(ref, folds)]
    if not labelled:
        raise FerDistError(f"data.labelled: no directory was sharded with --folds {folds} "
                           "(fer-dist shard ... --folds K)")

    def with_folds(refs: list[ShardsRef], which: list[int]) -> list[dict[str, Any]]:
        return [dict(ref.model_dump(), folds=which) if _folded(ref, folds) else ref.model_dump()
                for ref in refs]

    return {"labelled": with_folds(cfg.data.labelled, roles["train"]),
            "unlabelled": with_folds(cfg.data.unlabelled, roles["train"]),
            "val": with_folds(labelled, roles["val"]), "test": with_folds(labelled, roles["test"])}


def fold_overrides(cfg: TrainConfig, k: int, folds: int) -> list[str]:
    """`key=value` overrides that turn the config into fold k's run."""
    data = fold_data(cfg, k, folds)
    flow = {part: yaml.safe_dump(refs, default_flow_style=True, width=1 << 30).strip()
            for part, refs in data.items()}
    return [f"data.{part}={value}" for part, value in flow.items()] + [f"run.name={cfg.run.name}-fold{k}"]


def fold_record(run_dir: Path, evaluation: dict[str, Any], k: int) -> dict[str, Any]:
    """What one fold contributes to the table: its test fold's metrics and its run's figures."""
    summary = json.loads((run_dir / "summary.json").read_text())
    scored = evaluation["sets"][0]["all_classes"]
    return {"fold": k, "run": str(run_dir), "n": scored["n"], "accuracy": scored["accuracy"],
            "macro_f1": scored["macro_f1"], "uar": scored["uar"], "ece": scored["calibration"]["ece"],
            "best_val": summary.get("best_val"), "rounds": summary.get("rounds"), "best": summary.get("best")}


def summarise(records: list[dict[str, Any]], config: str, folds: int) -> dict[str, Any]:
    """Mean and standard deviation per metric over the folds."""
    return {"format": FORMAT, "config": config, "folds": folds, "records": records,
            "mean_std": {m: metrics.mean_std([r[m] for r in records]) for m in METRICS}}


def run_fold(command: list[str], run_dir: Path) -> None:
    """One fold's training (skipped when its run has finished); a failing fold stops the cross-validation."""
    if (run_dir / "summary.json").is_file():
        return
    result = subprocess.run(command)
    if result.returncode != 0:
        raise FerDistError(f"{run_dir.name}: training exited with code {result.returncode}; the same `cv` "
                           "command resumes it")


def test_target(cfg: TrainConfig, k: int, folds: int) -> ShardSplits:
    """Fold k's test set as `fer-dist eval` takes it."""
    ref = ShardsRef(**fold_data(cfg, k, folds)["test"][0])
    return ShardSplits(Path(ref.dir), tuple(ref.splits), tuple(ref.folds or ()))


def write_summary(summary: dict[str, Any], out: Path, *, overwrite: bool = False, about: str = "") -> Path:
    """`out`/cv.json, atomically; an existing `out` only with `overwrite`, and only an earlier cv output."""
    with written_folder(out, "cv", overwrite=overwrite, about=about) as tmp:
        (tmp / "cv.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return out / "cv.json"
