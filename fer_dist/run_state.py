"""A training run built: `build_run` reads the data before anything is written, then builds the model, the
optimiser and a fresh `State` (`fer_dist.checkpoint`, which also resumes it). `fer_dist.train` only
orchestrates what is built here.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from fer_dist import dist, method, stopsignals
from fer_dist.checkpoint import Run, State
from fer_dist.classes import NUM_CLASSES
from fer_dist.config import TrainConfig, model_spec_fields
from fer_dist.data.augment import eval_transform, train_transform
from fer_dist.data.runset import RunData, load_run_data
from fer_dist.data.stream import Loaders
from fer_dist.errors import FerDistError
from fer_dist.files import first_missing, removed_on_error
from fer_dist.hashing import derive_seed
from fer_dist.metrics import MetricsLog
from fer_dist.models import ModelSpec, build_model
from fer_dist.progress import Progress


def build_run(cfg: TrainConfig, acc, stop: stopsignals.StopRequest | None = None) -> Run:
    """Data, model, optimiser, loaders, a fresh state (`checkpoint.resume` then decides where the run
    starts)."""
    run_dir = Path(cfg.run.dir) / cfg.run.name
    torch.manual_seed(cfg.run.seed)  # same initial head on every process (DDP also broadcasts it)
    # before anything is written: no run folder left on bad data; the ranks split the label pass
    data = load_run_data(cfg.data, cfg.run.seed, partial(dist.label_pass, acc))
    created = first_missing(run_dir) if acc.is_main_process else None
    with removed_on_error(created):
        return _build(cfg, acc, stop, run_dir, data, created)


def _build(cfg: TrainConfig, acc, stop: stopsignals.StopRequest | None, run_dir: Path, data: RunData,
           created: Path | None) -> Run:
    """build_run once the data is read: model, optimiser, loaders, a fresh state."""
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
    # One loader per kind of stream over every shard of the run: their workers start at the first pass
    faces = net.input_spec
    shards = data.train_shards + data.val_shards + data.test_shards
    loaders = Loaders(shards, num_workers=cfg.data.num_workers,
                      train=train_transform(faces) if cfg.data.augment else eval_transform(faces),
                      exhaustive=eval_transform(faces))
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=acc.is_main_process, tensorboard=cfg.run.tensorboard)
    return Run(cfg, acc, run_dir, data, model, optimizer, scheduler, State(targets=targets), log,
               stop or stopsignals.StopRequest(),
               Progress(enabled=acc.is_main_process and cfg.run.progress, every_s=cfg.run.progress_every_s),
               created, loaders)
