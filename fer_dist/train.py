"""`accelerate launch -m fer_dist.train --config <yaml> [key=value ...]`: warm-up, then self-training rounds.

Reads top to bottom: `main` parses and builds, `fit` runs the warm-up epochs (METHOD.md section 2) and the
rounds (section 3: predict -> gather -> rewrite -> compose -> train -> validate) until the stopping rule
(section 4), then tests the best model. The math is in `fer_dist.method`, the process plumbing in
`fer_dist.dist`, checkpoints in `fer_dist.checkpoint`: this module only orchestrates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fer_dist import checkpoint, dist, launch, method, numerics
from fer_dist.classes import NUM_CLASSES
from fer_dist.config import (
    TrainConfig,
    dump_config,
    keys_help,
    load_config,
    model_spec_fields,
    overrides_name_data,
)
from fer_dist.data.augment import eval_transform, train_transform
from fer_dist.data.plan import derive_seed
from fer_dist.data.stream import close_loader_workers, exhaustive_loader, train_loader
from fer_dist.errors import FerDistError
from fer_dist.files import first_missing, removed_on_error, write_text_atomic
from fer_dist.metrics import MetricsLog
from fer_dist.models import ModelSpec, build_model, export_model, load_exported, preprocessing_of
from fer_dist.progress import Progress
from fer_dist.run_data import RunData, load_run_data

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "launch_configs" / "train" / "quickstart_synthetic.yaml"


class StopRun(Exception):
    """Raised at a step boundary once every process agreed to stop (SIGTERM / SIGUSR1)."""


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
    stop: dist.StopRequest
    progress: Progress

    @property
    def net(self) -> torch.nn.Module:
        """The model without its DDP wrapper: prediction and export run on it."""
        return self.acc.unwrap_model(self.model)


# ----------------------------------------------------------------------------------------------------------
# building and resuming


def build_run(cfg: TrainConfig, acc, stop: dist.StopRequest | None = None) -> Run:
    """Data, model, optimiser, state; then the latest checkpoint if `run.resume` asks for it."""
    run_dir = Path(cfg.run.dir) / cfg.run.name
    if acc.device.type == "cpu":
        # Each process gets its share of the cores: oversubscribed OpenMP threads made CPU steps ~15x slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // acc.num_processes))
    torch.manual_seed(cfg.run.seed)  # same initial head on every process (DDP also broadcasts it)
    data = load_run_data(cfg.data)  # before anything is written: bad data leaves no run folder behind
    created = first_missing(run_dir) if acc.is_main_process else None
    with removed_on_error(created):
        return _build(cfg, acc, stop, run_dir, data)


def _build(cfg: TrainConfig, acc, stop: dist.StopRequest | None, run_dir: Path, data: RunData) -> Run:
    """build_run once the data is read: model, optimiser, state, then the resume."""
    if acc.is_main_process:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    spec = ModelSpec(num_classes=NUM_CLASSES, **model_spec_fields(cfg.model.model_dump()))
    net = build_model(spec)
    if cfg.model.sync_bn and acc.num_processes > 1:
        if acc.device.type == "cpu":  # torch's SyncBatchNorm refuses CPU tensors in its training forward
            raise FerDistError("model.sync_bn: SyncBatchNorm needs GPUs; this run is on the CPU (set false)")
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # same state_dict keys: exports unchanged
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                 weight_decay=cfg.optim.weight_decay)
    warm = cfg.optim.lr_warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    # The scheduler stays out of prepare(): Accelerate's wrapper steps it once per process per step.
    model, optimizer = acc.prepare(net, optimizer)
    # Dropout masks differ between processes (the model itself is already identical: DDP broadcast it).
    torch.manual_seed(derive_seed(cfg.run.seed, acc.process_index, 1))
    eps = cfg.method.eps if cfg.method.label_smoothing else 0.0
    targets = torch.zeros(data.num_ids, NUM_CLASSES)
    targets[data.labelled] = method.smooth_labels(data.labels[data.labelled], NUM_CLASSES, eps)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=acc.is_main_process, tensorboard=cfg.run.tensorboard)
    run = Run(cfg, acc, run_dir, data, model, optimizer, scheduler, State(targets=targets), log,
              stop or dist.StopRequest(),
              Progress(enabled=acc.is_main_process and cfg.run.progress, every_s=cfg.run.progress_every_s))
    if not resume_from(run) and acc.is_main_process and (run_dir / "best").exists():
        shutil.rmtree(run_dir / "best")  # an earlier run's model must never be tested as this one's
    if acc.is_main_process:
        dump_config(cfg, run_dir / "config.yaml")
    if data.skipped:
        run.log.say(f"data.on_error=skip: left out {len(data.skipped)} damaged sample(s) or shard(s), "
                    f"the first: {data.skipped[0]}")
        run.log.write("data", run.state.step, {"data/skipped": len(data.skipped)})
    acc.wait_for_everyone()
    return run


def resume_from(run: Run) -> bool:
    """Load the checkpoint `run.resume` names (auto: the latest), checking that it fits this run."""
    how = run.cfg.run.resume
    path = None if how == "never" else checkpoint.latest_checkpoint(run.dir) if how == "auto" else Path(how)
    if path is None:
        MetricsLog.truncate(run.log.path, 0) if run.acc.is_main_process else None
        return False
    saved, _ = checkpoint.load_checkpoint(path, None)
    if saved["offsets"] != run.data.shardset.offsets:
        raise FerDistError(f"{path}: its shard directories or their sizes differ from this config's data")
    if saved["state"]["step_in_epoch"]:
        check_mid_epoch(path, saved, run)
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
    st = run.state
    run.log.say(f"resumed from {path} (phase {st.phase}, round {st.round}, step {st.step})")
    return True


def restore_process_rng(run: Run, path: Path, saved_world: int) -> None:
    """Each process's RNG (dropout masks: which samples and augmentations come from keyed seeds, not from
    it) as saved on the same number of processes; on another number, drawn afresh from (seed, rank, step)."""
    rank = run.acc.process_index
    if saved_world == run.acc.num_processes:
        checkpoint.restore_rng(checkpoint.load_rng(path, rank))
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
    checkpoint.save_checkpoint(run.acc, run.dir, tag, state, keep_last=run.cfg.run.keep_last, is_best=is_best,
                               meta=meta)


# ----------------------------------------------------------------------------------------------------------
# the pieces of an epoch


def train_epoch(run: Run, include: torch.Tensor, name: str) -> float:
    """One epoch over the ids in `include` against the target table; returns the mean loss."""
    cfg, acc, st = run.cfg, run.acc, run.state
    tf = train_transform(run.net.input_spec) if cfg.data.augment else eval_transform(run.net.input_spec)
    stream = train_loader(run.data.train_shards, include, st.targets, transform=tf,
                          global_batch=cfg.optim.batch_size, rank=acc.process_index, world=acc.num_processes,
                          num_workers=cfg.data.num_workers, seed=cfg.run.seed, epoch=st.epochs_started,
                          skip_batches=st.step_in_epoch)
    run.model.train()
    seen, tick = 0, time.perf_counter()
    # The epoch's loss sum stays on the device; it is added to st.epoch_loss (a float, checkpointed) only
    # where the host reads it anyway: at a log step, a save and the epoch's end.
    pending = torch.zeros((), dtype=torch.float64, device=acc.device)

    def settle() -> None:
        st.epoch_loss += float(pending)
        pending.zero_()

    with run.progress.task(name, total=stream.steps, completed=st.step_in_epoch) as bar:
        for images, targets, _ids in stream:
            loss = train_step(run, images, targets)
            pending.add_(torch.where(torch.isfinite(loss), loss, 0.0).double())
            st.step += 1
            st.step_in_epoch += 1
            seen += images.shape[0] * acc.num_processes
            rate = seen / max(time.perf_counter() - tick, 1e-9)
            if st.step % cfg.run.log_every == 0:
                run.log.write("step", st.step, {"train/loss": float(loss), "train/images_per_s": rate,
                                                "train/lr": run.scheduler.get_last_lr()[0]})
                seen, tick = 0, time.perf_counter()
            bar.advance(loss=loss, images_per_s=rate)  # the bar reads the loss only when it shows it
            every = cfg.run.checkpoint_every_steps
            if every and st.step % every == 0 and st.step_in_epoch < stream.steps:
                settle()
                save(run, f"step-{st.step:08d}")
            # A stop request is agreed on (a collective and a sync) every few steps and at the epoch's end,
            # at the same steps on every process.
            check = st.step % cfg.run.stop_check_every == 0 or st.step_in_epoch == stream.steps
            if check and dist.any_process(acc, run.stop.requested):
                settle()
                save(run, f"step-{st.step:08d}")
                raise StopRun(f"stopped on request ({run.stop.signal_name}) at step {st.step}")
    settle()
    trained = st.step_in_epoch - st.skipped_in_epoch  # skipped steps are the same on every process
    mean = dist.all_sum(acc, torch.tensor(st.epoch_loss)) / max(1, trained * acc.num_processes)
    st.step_in_epoch, st.epoch_loss, st.skipped_in_epoch = 0, 0.0, 0
    st.epochs_started += 1
    return float(mean)


def train_step(run: Run, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Forward, soft-target loss, backward, clip, step. Every process has batch_size / W samples. Returns
    the loss on the device: reading it is a host sync, left to the steps that log it."""
    images, targets = images.to(run.acc.device), targets.to(run.acc.device)
    with run.acc.autocast():
        logits = run.model(images)
    loss = method.soft_cross_entropy(logits.float(), targets)
    run.acc.backward(loss)
    norm = numerics.grad_norm(run.acc, run.model, run.cfg.optim.grad_clip)
    if numerics.allows_step(norm):
        run.optimizer.step()
        run.scheduler.step()
    else:
        skip_step(run, float(loss), float(norm))
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def skip_step(run: Run, loss: float, norm: float) -> None:
    """A non-finite gradient (alike on every process: DDP averaged it): no optimiser step, a warning, and
    the run ends once more than optim.max_nonfinite_steps such steps were skipped."""
    st, limit = run.state, run.cfg.optim.max_nonfinite_steps
    st.nonfinite_steps += 1
    st.skipped_in_epoch += 1
    run.log.say(f"step {st.step + 1}: non-finite loss {loss:.4g} or gradient norm {norm:.4g}: step skipped "
                f"({st.nonfinite_steps} of at most {limit})")
    error = numerics.too_many(st.nonfinite_steps, limit, st.step + 1)
    if error is not None:
        raise error


@torch.no_grad()
def predict(run: Run, shards, include: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """p(.|x) for every id in `include`, gathered on every process: ids [M], probs [M, K], gather stats."""
    net, acc = run.net, run.acc
    dist.broadcast_buffers(acc, net)
    net.eval()
    stream = exhaustive_loader(shards, include, transform=eval_transform(net.input_spec),
                               batch_size=run.cfg.run.eval_batch_size, rank=acc.process_index,
                               world=acc.num_processes, num_workers=run.cfg.data.num_workers)
    ids_parts, prob_parts = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, NUM_CLASSES)]
    autocast = acc.autocast() if acc.device.type != "cpu" else nullcontext()
    with run.progress.task(name, total=None) as bar, autocast:
        for images, _labels, ids in stream:
            logits = net(images.to(acc.device)).float()
            prob_parts.append(torch.softmax(logits, dim=1).cpu())
            ids_parts.append(ids)
            bar.advance()
    tick = time.perf_counter()
    ids, probs, stats = dist.gather_with_stats(acc, torch.cat(ids_parts), torch.cat(prob_parts))
    expected = int(include.sum())
    if ids.numel() != expected:
        raise RuntimeError(f"{name}: gathered {ids.numel()} predictions for {expected} samples")
    return ids, probs, {"seconds": time.perf_counter() - tick, "bytes": stats.bytes}


def accuracy(run: Run, shards, mask: torch.Tensor, name: str) -> float:
    """Top-1 accuracy over the labelled ids in `mask`, identical on every process."""
    ids, probs, _ = predict(run, shards, mask, name)
    return float((probs.argmax(1) == run.data.labels[ids]).float().mean())


def validate(run: Run, kind: str, index: int, values: dict[str, Any]) -> bool:
    """Validation accuracy: recorded, and the model exported when it is the best so far (returned)."""
    st = run.state
    acc_val = accuracy(run, run.data.val_shards, run.data.val, "validate")
    improved = acc_val > st.best_acc
    if improved:
        st.best_acc = acc_val
        numerics.check_finite_weights(run.net, f"{run.dir / 'best'}")  # on every process: all raise alike
        # the labelled shards' alignment, side and channels: `fer-dist predict` makes faces the same way
        labelled = run.data.shardset.manifests[run.data.shardset.entries[0][0]]
        dist.main_agreed(run.acc, lambda: export_model(run.net, run.dir / "best",
                                                       preprocessing=preprocessing_of(labelled)))
    record = {"val/acc": acc_val, "val/best": st.best_acc, **values}
    st.history.append({"kind": kind, "index": index, **record})
    run.log.write(kind, st.step, {kind: index, **record})
    shown = {"train/loss": "loss", "unlabelled/confident": "confident", "unlabelled/drawn": "drawn",
             "labelled/reset": "alpha-reset"}
    run.log.say(f"{kind} {index}: val acc {acc_val:.4f} (best {st.best_acc:.4f})"
                + "".join(f", {name} {_number(values[k])}" for k, name in shown.items() if k in values))
    return improved


def _number(value: Any) -> str:
    """Counts as integers, other figures to four significant digits (log lines and the summary)."""
    return str(value) if isinstance(value, int) else f"{value:.4g}"


# ----------------------------------------------------------------------------------------------------------
# the two phases


def warmup(run: Run) -> None:
    """METHOD.md 2: supervised epochs on X_l until val accuracy stops improving or warmup_epochs."""
    m, st = run.cfg.method, run.state
    while st.epoch < m.warmup_epochs and st.bad_epochs < m.warmup_patience:
        loss = train_epoch(run, run.data.labelled, f"warm-up {st.epoch + 1}")
        st.epoch += 1
        improved = validate(run, "warmup", st.epoch, {"train/loss": loss})
        st.bad_epochs = 0 if improved else st.bad_epochs + 1
        save(run, f"warmup-{st.epoch:04d}", is_best=improved)
    st.phase = "rounds" if m.self_training and m.max_rounds > 0 else "done"
    if st.best_acc >= 0:
        # theta_0 is the best warm-up model, not the last one (which is `patience` epochs past it)
        load_best(run)
    save(run, f"warmup-{st.epoch:04d}")


def load_best(run: Run) -> None:
    """Every process loads `best/` and checks that they all hold the same weights."""
    run.net.load_state_dict(load_exported(run.dir / "best").state_dict())
    flat = torch.cat([p.detach().reshape(-1).cpu().float() for p in run.net.state_dict().values()])
    dist.check_same_everywhere(run.acc, flat, f"{run.dir / 'best'} as loaded")


def compose(run: Run) -> dict[str, Any]:
    """METHOD.md 3.1-3.4: predict all, gather, rewrite the one target table, draw the round's set."""
    m, data = run.cfg.method, run.data
    pool = data.labelled | data.unlabelled if m.use_unlabelled else data.labelled
    tick = time.perf_counter()
    ids, probs, gather = predict(run, data.train_shards, pool, "predict")
    t_predict = time.perf_counter() - tick - gather["seconds"]
    tick = time.perf_counter()
    stats = rewrite_and_draw(run, ids, probs)
    selection = stats.pop("selection")
    return {**stats, "time/predict": t_predict, "time/gather": gather["seconds"],
            "time/rewrite": time.perf_counter() - tick, "gather/bytes": gather["bytes"],
            "selection": selection}


def rewrite_and_draw(run: Run, ids: torch.Tensor, probs: torch.Tensor) -> dict[str, Any]:
    """METHOD.md 3.2-3.4 on the gathered predictions (ids [M] sorted, probs [M, K], alike on every process).

    Rewrites the target table's rows, draws the round's set into `state.include`, returns the round's stats.
    """
    m, st, data = run.cfg.method, run.state, run.data
    labels = data.method_labels()[ids]
    taus = method.class_thresholds(probs, labels, tau=m.tau, mode=m.threshold)
    rw = method.rewrite_targets(probs, labels, st.targets[ids], tau=m.tau if m.threshold == "fixed" else taus,
                                alpha=m.alpha if m.alpha_rule else None)
    st.targets[ids] = rw.targets
    if run.cfg.run.debug:
        dist.check_same_everywhere(run.acc, st.targets, f"target table after round {st.round + 1}")
    confident = ids[rw.confident] if m.use_unlabelled else ids[:0]
    draw = method.compose_round(ids[labels >= 0], confident, fraction=m.replace_fraction,
                                seed=run.cfg.run.seed, round_index=st.round)
    include = data.labelled.clone()
    include[draw.removed] = False
    include[draw.added] = True
    st.include = include
    conf_probs = probs[rw.confident]
    mean_conf = float(conf_probs.max(1).values.mean()) if conf_probs.numel() else float("nan")
    added_classes = st.targets[draw.added].argmax(1)
    return {
        "unlabelled/confident": int(rw.confident.sum()),
        "unlabelled/drawn": int(draw.added.numel()),
        "unlabelled/class_hist": torch.bincount(added_classes, minlength=NUM_CLASSES).tolist(),
        "unlabelled/mean_conf": mean_conf,
        "unlabelled/thresholds": taus.tolist(),
        "labelled/reset": int(rw.reset.sum()),
        "labelled/kept": int(rw.kept.sum()),
        "labelled/removed": int(draw.removed.numel()),
        "selection": {"confident": confident, "removed": draw.removed, "added": draw.added},
    }


def self_train(run: Run) -> None:
    """METHOD.md 3-4: rounds until the moving average of val accuracy falls, or max_rounds."""
    m, st = run.cfg.method, run.state
    while st.round < m.max_rounds:
        if st.include is None:  # not composed yet (a resume mid-round goes straight on training)
            st.round_stats = compose(run)
        tick = time.perf_counter()
        while st.round_epoch < m.epochs_per_round:
            e = st.round_epoch
            st.round_stats["train/loss"] = train_epoch(
                run, st.include, f"round {st.round + 1}" + (f".{e + 1}" if e else ""))
            st.round_epoch += 1
        st.round, st.round_epoch = st.round + 1, 0
        stats = dict(st.round_stats, **{"time/train": time.perf_counter() - tick})
        selection = stats.pop("selection")
        st.include, st.round_stats = None, {}
        improved = validate(run, "round", st.round, stats)
        st.history[-1]["selection"] = selection
        accs = [h["val/acc"] for h in st.history if h["kind"] == "round"]
        if method.should_stop(accs, m.stop_window):
            st.stop_reason = f"moving average of {m.stop_window} rounds fell"
            st.phase = "done"
        elif st.round >= m.max_rounds:
            st.stop_reason = f"max_rounds ({m.max_rounds})"
            st.phase = "done"
        save(run, f"round-{st.round:04d}", is_best=improved)
        if st.phase == "done":
            return
        if run.cfg.run.stop_after_rounds is not None and st.round >= run.cfg.run.stop_after_rounds:
            raise StopRun(f"stopped after round {st.round} (run.stop_after_rounds)")
    st.phase = "done"


def best_entry(history: list[dict[str, Any]], best_acc: float) -> dict[str, Any] | None:
    """The warm-up epoch or round whose model is `best/`: the first to reach the best accuracy."""
    return next((h for h in history if h["val/acc"] == best_acc), None)


def finish(run: Run) -> dict[str, Any]:
    """Test the best model; log the test record, write summary.json; returns the summary."""
    st = run.state
    if st.best_acc >= 0:
        load_best(run)
    test_acc = accuracy(run, run.data.test_shards, run.data.test, "test") if run.data.test.any() else None
    warm = [h["val/acc"] for h in st.history if h["kind"] == "warmup"]
    best = best_entry(st.history, st.best_acc)
    summary = {
        "run": str(run.dir), "processes": run.acc.num_processes,
        "warmup_epochs": st.epoch, "warmup_best_val": round(max(warm), 4) if warm else None,
        "rounds": st.round, "stop_reason": st.stop_reason or "warm-up only",
        "best": f"{best['kind']} {best['index']}" if best else None,
        "best_val": round(st.best_acc, 4), "best_model": str(run.dir / "best") if best else None,
        "test_acc_of_best": round(test_acc, 4) if test_acc is not None else None,
        "test_samples": int(run.data.test.sum()), "steps": st.step,
    }
    run.log.write("test", st.step, {"test/acc": test_acc, "test/samples": summary["test_samples"],
                                    "best": summary["best"]})
    if run.acc.is_main_process:
        write_text_atomic(run.dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        run.progress.summary(summary)
    return summary


def already_finished(run: Run) -> dict[str, Any]:
    """A finished run asked to run again: say so and how to start afresh, rather than test it again."""
    summary = json.loads((run.dir / "summary.json").read_text())
    # resuming cut metrics.jsonl back to the last checkpoint, which precedes the test: log it again
    run.log.write("test", run.state.step, {"test/acc": summary.get("test_acc_of_best"),
                                           "test/samples": summary.get("test_samples"),
                                           "best": summary.get("best")})
    run.log.say(f"{run.dir} has already finished ({summary.get('stop_reason')}): best {summary.get('best')}, "
                f"val {summary.get('best_val')}, test {summary.get('test_acc_of_best')}, model "
                f"{summary.get('best_model')}. To train it again from scratch: run.resume=never (replaces "
                "it), or another run.name=...")
    if run.acc.is_main_process:
        run.progress.summary(summary)
    return summary


def fit(run: Run) -> dict[str, Any]:
    """The whole run from wherever its state stands."""
    if run.state.phase == "done" and (run.dir / "summary.json").is_file():
        return already_finished(run)
    if run.state.phase == "warmup":
        warmup(run)
    if run.state.phase == "rounds":
        self_train(run)
    return finish(run)


# ----------------------------------------------------------------------------------------------------------
# entry point


def parse_args(argv: list[str] | None) -> tuple[Path | None, list[str]]:
    """`--config PATH` and `key=value` overrides; --help lists every config key."""
    p = argparse.ArgumentParser(prog="fer_dist.train", description=__doc__.split("\n")[0],
                                epilog=keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help="training config YAML (default: the synthetic quick start)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.tau=0.8 or tau=0.8")
    args = p.parse_args(argv)
    return args.config, args.overrides


def main(argv: list[str] | None = None) -> int:
    """Parse, build, fit, clean up; expected errors become one line and exit code 2."""
    stop = dist.StopRequest()  # first: a stop asked for during the set-up is honoured at the first step
    run, requeue = None, False
    try:
        config_path, overrides = parse_args(argv)
        cfg = load_config(config_path or QUICKSTART, overrides)
        if config_path is None and not overrides_name_data(overrides):
            ensure_synthetic_shards(Path(cfg.data.labelled[0].dir))
        acc = dist.make_accelerator(mixed_precision=cfg.run.mixed_precision,
                                    expected_processes=cfg.run.num_processes,
                                    timeout_s=cfg.run.collective_timeout_s)
        run = build_run(cfg, acc, stop)
        fit(run)
        return 0
    except FerDistError as e:
        launch.report_error(" ".join(str(e).split()))
        return 2
    except StopRun as e:
        requeue = run is not None and launch.requeue_due(run)
        return launch.stopped(run, str(e)) if run is not None else 0
    finally:
        close_loader_workers()
        if run is not None:
            run.log.close()
        dist.shutdown()
        stop.close()
        if requeue:
            launch.requeue(run)  # last: it ends every process of the job


def ensure_synthetic_shards(out: Path) -> None:
    """The quick start (no --config, no data override) shards the synthetic set first where it is missing."""
    if (out / "manifest.json").exists():
        return
    if dist.is_main_launch_process():
        print(f"{out} is missing: sharding the built-in synthetic data set first", file=sys.stderr)
        from fer_dist.data.pack import pack

        pack("synthetic", [], out)
    dist.wait_for_file(out / "manifest.json")


if __name__ == "__main__":
    sys.exit(main())
