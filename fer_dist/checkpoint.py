"""A run's state and its checkpoints: `State` (what a resume needs besides model and optimiser), `Run` (what
`fit` works with), `save` (the one writer of checkpoints) and `resume` (where a run starts: its latest
checkpoint, another run's finished warm-up, or the beginning).

The files themselves (layout, atomic save protocol, keep last k + best, loading, RNG capture) are
`fer_dist.checkpoint_files`: that module knows nothing of a run, this one nothing of the files' protocol.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fer_dist import checkpoint_files, dist, numerics, stopsignals
from fer_dist.config import TrainConfig, dump_config, warmup_identity
from fer_dist.data.runset import RunData
from fer_dist.errors import FerDistError
from fer_dist.files import removed_on_error
from fer_dist.hashing import derive_seed
from fer_dist.metrics import MetricsLog
from fer_dist.progress import Progress

if TYPE_CHECKING:
    from fer_dist.data.stream import Loaders


@dataclass
class State:
    """Everything about the run's progress that a resume needs besides model and optimiser."""

    targets: torch.Tensor                   # [num_ids, K]: q, the one global target table
    phase: str = "warmup"                   # warmup | rounds | done
    epoch: int = 0                          # warm-up epochs finished
    round: int = 0                          # rounds finished
    epochs_started: int = 0                 # every epoch so far: seeds the stream of the next one
    step: int = 0                           # optimiser steps
    step_in_epoch: int = 0                  # batches of the current epoch already trained (mid-epoch resume)
    epoch_loss: float = 0.0                 # this process's loss sum over those batches
    include: torch.Tensor | None = None     # the current round's training set, once composed
    round_stats: dict[str, Any] = field(default_factory=dict)  # what compose() found for the current round
    round_epoch: int = 0                    # epochs of the current round finished (epochs_per_round > 1)
    best_acc: float = -1.0
    bad_epochs: int = 0                     # warm-up epochs without a better validation accuracy
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = ""
    rule_stop_round: int | None = None      # the round METHOD.md 4's rule stopped (or, with stop_rule none,
                                            # would have stopped) at
    nonfinite_steps: int = 0                # optimiser steps skipped for a non-finite gradient
    skipped_in_epoch: int = 0               # of them in the current epoch (left out of its mean loss)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Run:
    """What `fit` works with; built once by `build_run`."""

    cfg: TrainConfig
    acc: Any  # accelerate.Accelerator
    dir: Path
    data: RunData
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: State
    log: MetricsLog
    stop: stopsignals.StopRequest
    progress: Progress
    created: Path | None = None  # the run folder this launch made: removed if its set-up fails
    loaders: Loaders | None = None  # its streams' DataLoaders (build_run makes them, train.main closes them)

    @property
    def net(self) -> torch.nn.Module:
        """The model without its DDP wrapper: prediction and export run on it."""
        return self.acc.unwrap_model(self.model)


def resume(run: Run) -> None:
    """Where the run starts: the checkpoint `run.resume` names, else `run.warmup_from`'s warm-up, else the
    beginning (an earlier run's best/ removed); then its config.yaml. A failure removes the run folder this
    launch made (`Run.created`)."""
    acc = run.acc
    with removed_on_error(run.created):
        resumed = resume_from(run) or (run.cfg.run.warmup_from is not None and start_from_warmup(run))
        if not resumed and acc.is_main_process and (run.dir / "best").exists():
            shutil.rmtree(run.dir / "best")  # an earlier run's model must never be tested as this one's
        if acc.is_main_process:
            dump_config(run.cfg, run.dir / "config.yaml")
    if run.data.skipped:  # logged here: the log was just cut to the checkpoint's offset
        run.log.say(f"data.on_error=skip: left out {len(run.data.skipped)} damaged sample(s) or shard(s), "
                    f"the first: {run.data.skipped[0]}")
        run.log.write("data", run.state.step, {"data/skipped": len(run.data.skipped)})
    acc.wait_for_everyone()


def resume_from(run: Run) -> bool:
    """Load the checkpoint `run.resume` names (auto: the latest), checking that it fits this run."""
    how = run.cfg.run.resume
    latest = checkpoint_files.latest_checkpoint
    path = None if how == "never" else latest(run.dir) if how == "auto" else Path(how)
    if path is None:
        MetricsLog.truncate(run.log.path, 0) if run.acc.is_main_process else None
        return False
    saved, _ = checkpoint_files.load_checkpoint(path, None)
    if saved["state"]["step_in_epoch"]:
        check_mid_epoch(path, saved, run)
    restore(run, path, saved)
    st = run.state
    run.log.say(f"resumed from {path} (phase {st.phase}, round {st.round}, step {st.step})")
    return True


def _differing_key(was: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first warm-up key whose value differs between two config dicts, with both values; else None."""
    a, b = warmup_identity(was), warmup_identity(now)
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            return f"{name} (warm-up {a.get(name)!r}, this run {b.get(name)!r})"
    return None


def start_from_warmup(run: Run) -> bool:
    """A run without checkpoints of its own starts its rounds from `run.warmup_from`'s finished warm-up: its
    last checkpoint (the best warm-up model, the optimiser, RNG, history), its best/ and its log up to there.
    Arms of one seed then share one warm-up exactly (resume is exact) and it is trained once."""
    source = Path(run.cfg.run.warmup_from)
    path = checkpoint_files.latest_checkpoint(source)
    if path is None:
        raise FerDistError(f"run.warmup_from: {source} holds no checkpoint (train its warm-up first)")
    saved, _ = checkpoint_files.load_checkpoint(path, None)
    st = saved["state"]
    if st["phase"] == "warmup" or st["round"] or st["step_in_epoch"]:
        raise FerDistError(f"run.warmup_from: {path} is not the end of a warm-up (phase {st['phase']}, "
                           f"round {st['round']})")
    differ = _differing_key(saved["config"], run.cfg.to_dict())
    if differ is not None:
        raise FerDistError(f"run.warmup_from: {source} trained another warm-up: {differ}")
    if run.acc.is_main_process:
        if (run.dir / "best").exists():
            shutil.rmtree(run.dir / "best")  # an earlier attempt's, never a result of this run
        if (source / "best").is_dir():
            shutil.copytree(source / "best", run.dir / "best")
        # the same inode the log appends to: its writes go on after the warm-up's records
        run.log.path.write_bytes((source / "metrics.jsonl").read_bytes()[: saved["metrics_offset"]])
    run.acc.wait_for_everyone()
    restore(run, path, saved)
    m = run.cfg.method
    run.state.phase = "rounds" if m.self_training and m.max_rounds > 0 else "done"
    run.state.stop_reason = ""
    run.log.say(f"rounds start from the warm-up of {source} ({path.name}, best val {run.state.best_acc:.4f})")
    return True


def restore(run: Run, path: Path, saved: dict[str, Any]) -> None:
    """Load a checkpoint's model, optimiser, state and RNG into the run (resume and warm-up start)."""
    if saved["offsets"] != run.data.shardset.offsets:
        raise FerDistError(f"{path}: its shard directories or their sizes differ from this config's data")
    run.net.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler") is not None and run.acc.scaler is not None:
        run.acc.scaler.load_state_dict(saved["scaler"])
    run.state = State(**saved["state"])
    # Every process starts from the epoch's loss so far, a total that does not depend on the number of
    # processes (save); train_epoch's mean sums the processes' and divides by their number.
    losses = saved.get("epoch_losses")  # before elastic resume: one running sum per process
    run.state.epoch_loss = sum(losses) / len(losses) if losses else float(saved["epoch_loss"])
    restore_process_rng(run, path, saved["world_size"])
    if run.acc.is_main_process:
        MetricsLog.truncate(run.log.path, saved["metrics_offset"])


def restore_process_rng(run: Run, path: Path, saved_world: int) -> None:
    """Each process's RNG (dropout masks: which samples and augmentations come from keyed seeds, not from
    it) as saved on the same number of processes; on another number, drawn afresh from (seed, rank, step)."""
    rank = run.acc.process_index
    if saved_world == run.acc.num_processes:
        checkpoint_files.restore_rng(checkpoint_files.load_rng(path, rank))
        return
    torch.manual_seed(derive_seed(run.cfg.run.seed, rank, 1, run.state.step))
    run.log.say(f"{path} was saved on {saved_world} processes, resumed on {run.acc.num_processes}: the same "
                "samples in every global batch; dropout masks and per-process batch statistics differ")


def check_mid_epoch(path: Path, saved: dict[str, Any], run: Run) -> None:
    """A mid-epoch position means the same global batches under the same seed and global batch size (on any
    number of processes and loader workers)."""
    was, now = saved["config"], run.cfg.to_dict()
    same = {
        "optim.batch_size": (was["optim"]["batch_size"], now["optim"]["batch_size"]),
        "run.seed": (was["run"]["seed"], now["run"]["seed"]),
    }
    for what, (before, after) in same.items():
        if before != after:
            raise FerDistError(f"{path}: saved mid-epoch with {what} = {before}, now {after}; resume with "
                               "the same value or from a warm-up/round checkpoint (resume=<its path>)")


def save(run: Run, tag: str, *, is_best: bool = False) -> None:
    """A checkpoint of everything (all processes take part; the main one writes the shared files)."""
    numerics.check_finite_weights(run.net, f"checkpoint {tag}")  # same weights everywhere: all raise alike
    # the epoch's loss so far, summed over its steps' global batches (the processes' sums over their number):
    # the same on any number of processes, so a resume on another ends with the same mean
    total = dist.all_sum(run.acc, float(run.state.epoch_loss)) / run.acc.num_processes
    state = {
        "epoch_loss": float(total),
        "model": run.net.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.acc.scaler.state_dict() if run.acc.scaler is not None else None,
        "state": run.state.to_dict(),
        "offsets": run.data.shardset.offsets,
        "world_size": run.acc.num_processes,
        "metrics_offset": run.log.offset(),
        "config": run.cfg.to_dict(),
    }
    meta = {"round": run.state.round, "step": run.state.step, "best_metric": run.state.best_acc,
            "phase": run.state.phase}
    checkpoint_files.save_checkpoint(run.acc, run.dir, tag, state, keep_last=run.cfg.run.keep_last,
                                     is_best=is_best, meta=meta)
