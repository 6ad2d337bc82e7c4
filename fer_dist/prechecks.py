"""What `fer-dist train` (and `cv`, `slurm submit`) refuse before anything starts, found in the calling
process: the config and its overrides, every shard folder, a resume path, a weights file, and the process
count against the config. Each raises FerDistError with one line; nothing here starts a process.
"""

from __future__ import annotations

import json
from pathlib import Path

from fer_dist.config import TrainConfig
from fer_dist.errors import FerDistError


def check_training(config: Path | None, overrides: list[str], *, dry_run: bool = False,
                   checked_to: Path | None = None) -> TrainConfig:
    """Everything a launch would refuse, found in this one process: the config, the overrides, every shard
    folder (manifests and labels), a resume path, a weights file. Raises FerDistError; writes nothing but
    the quick start's synthetic shards where they are missing (as the trainer would; a dry run leaves them
    missing and unchecked). `checked_to`: the label pass saved there for the ranks (`runset.launch_checked`).
    `launcher_args` adds the checks that depend on the number of processes."""
    from fer_dist.config import load_config, overrides_name_data
    from fer_dist.quickstart import QUICKSTART, ensure_synthetic_shards

    # a bad config or key is answered before torch loads
    cfg = load_config(config if config is not None else QUICKSTART, overrides)
    from fer_dist.data.runset import (
        CheckedLabels,
        OnError,
        ShardSet,
        checked_labels,
        load_run_data,
        save_checked,
    )

    if config is None and not overrides_name_data(overrides):
        shards = Path(cfg.data.labelled[0].dir)
        if dry_run and not (shards / "manifest.json").exists():
            return cfg
        ensure_synthetic_shards(shards)
    if cfg.model.weights is not None and not Path(cfg.model.weights).exists():
        raise FerDistError(f"model.weights: {cfg.model.weights} does not exist")
    if cfg.run.resume not in ("auto", "never"):
        check_resume(Path(cfg.run.resume))

    def label_pass(shardset: ShardSet, on_error: OnError) -> CheckedLabels:
        checked = checked_labels(shardset, on_error)
        if checked_to is not None:
            save_checked(checked_to, checked, shardset, on_error)
        return checked

    load_run_data(cfg.data, cfg.run.seed, label_pass)  # the subsets (data.*.share) the ranks will draw
    return cfg


def check_resume(path: Path) -> None:
    """`run.resume` names a checkpoint folder (`runs/<name>/checkpoints/<tag>`) whose meta.json reads."""
    from fer_dist.checkpoint_files import META, STATE

    where = "a checkpoint folder, runs/<name>/checkpoints/<tag>"
    if not path.exists():
        raise FerDistError(f"run.resume: {path} does not exist (name {where}, or auto)")
    if not path.is_dir():
        hint = f"; name its folder, {path.parent}" if path.name == STATE else ""
        raise FerDistError(f"run.resume: {path} is a file, not {where}{hint}")
    if not (path / STATE).is_file() or not (path / META).is_file():
        raise FerDistError(f"run.resume: {path} is not {where} (it has no {STATE} and {META})")
    try:
        json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise FerDistError(f"run.resume: {path / META} is not a readable checkpoint meta file") from None


def check_processes(processes: int | None, accelerate_config: Path | None) -> None:
    """The launch options alone, checked before anything is loaded."""
    if processes is not None and accelerate_config is not None:
        raise FerDistError("--processes and --accelerate-config: give one of them")
    if processes is not None and processes < 1:
        raise FerDistError(f"--processes: expected 1 or more, got {processes}")


def check_world(cfg: TrainConfig, count: int, *, cpu: bool) -> None:
    """What the ranks would refuse once started, given `count` processes (on CPUs when `cpu`)."""
    wanted = cfg.run.num_processes
    if wanted is not None and wanted != count:
        raise FerDistError(f"run.num_processes: the config asks for {wanted} processes but the launch would "
                           f"start {count}; launch {wanted} or leave run.num_processes unset")
    if cfg.optim.batch_size % count:
        raise FerDistError(f"optim.batch_size: {cfg.optim.batch_size} does not split evenly over {count} "
                           f"processes (each takes batch_size / {count}); use a multiple of {count}")
    if cfg.model.sync_bn and count > 1 and cpu:
        raise FerDistError("model.sync_bn: SyncBatchNorm needs GPUs; this run is on the CPU (set false)")
