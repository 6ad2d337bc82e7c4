"""Training throughput of the trainer's epoch: the real stream, the same epoch fed from RAM, a minimal loop.

    .venv/bin/python tools/bench/bench_train.py [--workers 0 1 2] [--shards DIR] [--device auto|cpu]
    .venv/bin/accelerate launch --config_file launch_configs/accelerate/cpu_2proc.yaml \\
        tools/bench/bench_train.py [--workers 1]      # the quick start: 2 processes, 1 worker each

Three sides, on the same model, process group, global batch and number of steps. The first two run
`fer_dist.train.train_epoch`, the trainer's own loop (train_step: forward, soft-target loss, backward, the
gradient norm's non-finite check, Adam step, the scheduler; the loss kept on the device and read back at log
steps; the step log; the stop agreement every run.stop_check_every steps; the progress bar with
--progress), and differ only in the batches' source:
- stream: train_loader over the shards (the train split of --shards, default shards/synthetic), METHOD.md
  augmentation on, --workers DataLoader workers per process, exactly as train_epoch builds it; each timed
  epoch includes the loader's start (worker fork, first reads), which every real epoch pays.
- memory: the batches of one stream epoch, decoded and augmented beforehand and held in RAM, handed to
  train_epoch in place of the stream (the run's loaders.train is swapped for the duration), cycled for as
  many steps.
- minimal: the least a PyTorch loop does per step, over the same batches in RAM: the trainer's model as
  accelerator.prepare() returned it (DDP under several processes) and the torch.optim.Adam inside its
  optimiser; images and targets to the device, forward, torch's cross-entropy against the soft targets,
  zero_grad, backward, step. Nothing else: no log, no stop agreement, no host sync, no gradient norm.
An epoch covers --include all (the round pool: every train id) or labelled (a warm-up epoch); --samples N
picks N of them at random. Each side runs --repeat times, interleaved (stream, memory, minimal, then the
reverse). Reported: samples/s (global, all processes); the stream's cost 1 - stream / memory (the loader's
cost; target: at most 5 %) and the trainer's own overhead 1 - memory / minimal, each from the best of each
side, the medians, the median over repeats of each epoch against the one next to it (the machine's drift
cancels within a pair; memory runs between the other two), and in CPU seconds.

On a CPU the stream's workers compete with the steps for the same cores: with P processes of T torch
threads and W workers each, P * (T + W) busy threads share the machine, so the stream's decode and
augmentation CPU time shows up as a cost there; on a GPU machine the workers use otherwise idle cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from trainer_setup import add_common_options, close, cpu_seconds, describe, make_run, timed

import fer_dist.train as trainer
from fer_dist import dist
from fer_dist.classes import NUM_CLASSES
from fer_dist.data.augment import train_transform
from fer_dist.data.stream import train_loader
from fer_dist.progress import Progress
from fer_dist.train import Run


class MemoryStream:
    """train_loader's interface (`steps`, iteration) over batches already in RAM, cycled."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return itertools.islice(itertools.cycle(self.batches), self.steps)


@contextmanager
def fed_from(run: Run, stream: MemoryStream):
    """train_epoch takes its batches from `stream` instead of the run's training loader."""
    run.loaders.train = lambda *a, **k: stream  # an instance attribute, over the method
    try:
        yield
    finally:
        del run.loaders.train


def epoch_ids(run: Run, include: str, samples: int | None) -> torch.Tensor:
    """The epoch's include mask: every train id or the labelled ones, optionally N of them at random."""
    data = run.data
    mask = data.labelled | data.unlabelled if include == "all" else data.labelled.clone()
    if samples is not None and samples < int(mask.sum()):
        chosen = torch.nonzero(mask).squeeze(1)
        keep = chosen[torch.randperm(chosen.numel(), generator=torch.Generator().manual_seed(0))[:samples]]
        mask = torch.zeros_like(mask)
        mask[keep] = True
    return mask


def prepare_memory(run: Run, include: torch.Tensor, limit: int) -> MemoryStream:
    """One stream epoch's batches (the same transform, batch and targets), at most `limit` of them kept."""
    cfg, acc = run.cfg, run.acc
    stream = train_loader(run.data.train_shards, include, run.state.targets,
                          transform=train_transform(run.net.input_spec), global_batch=cfg.optim.batch_size,
                          rank=acc.process_index, world=acc.num_processes, num_workers=cfg.data.num_workers,
                          seed=cfg.run.seed, epoch=10_000)
    batches = [(images.clone(), targets.clone(), ids)
               for images, targets, ids in itertools.islice(stream, limit)]
    return MemoryStream(batches, stream.steps)


def minimal_epoch(run: Run, batches: MemoryStream) -> None:
    """The minimal loop: forward, soft-target cross-entropy, backward, Adam step; nothing else."""
    model, device = run.model, run.acc.device  # as accelerator.prepare() returned it: DDP under W > 1
    adam = getattr(run.optimizer, "optimizer", run.optimizer)  # the torch.optim.Adam Accelerate wraps
    precision = run.cfg.run.mixed_precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    model.train()
    for images, targets, _ids in batches:
        images, targets = images.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), targets)  # probabilities as targets: soft-target CE
        adam.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            adam.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(adam)
            scaler.update()


SIDES = ("stream", "memory", "minimal")


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def measure(run: Run, include: torch.Tensor, repeat: int, limit: int) -> dict:
    """Best-of-`repeat` global samples/s of the three sides, interleaved (ABC, CBA, ...)."""
    acc, st = run.acc, run.state
    memory = prepare_memory(run, include, limit)
    steps = memory.steps
    samples = steps * (run.cfg.optim.batch_size // acc.num_processes) * acc.num_processes
    times: dict[str, list[float]] = {name: [] for name in SIDES}
    cpu: dict[str, list[float]] = {name: [] for name in SIDES}

    def epoch(name: str) -> None:
        if name == "stream":
            trainer.train_epoch(run, include, "bench")
        elif name == "memory":
            with fed_from(run, memory):
                trainer.train_epoch(run, include, "bench")
        else:
            minimal_epoch(run, memory)

    def one(name: str) -> None:
        st.step_in_epoch, st.epoch_loss = 0, 0.0
        before = cpu_seconds()
        t, _ = timed(acc, lambda: epoch(name))
        times[name].append(t)
        cpu[name].append(float(dist.all_sum(acc, cpu_seconds() - before)))  # all processes and workers

    for name in ("memory", "minimal"):  # warm-up: allocator, autotuning, first-touch pages
        one(name)
        times[name].clear()
        cpu[name].clear()
    for i in range(repeat):
        for name in SIDES if i % 2 == 0 else SIDES[::-1]:
            one(name)
    best = {k: samples / min(v) for k, v in times.items()}
    median = {k: samples / _median(v) for k, v in times.items()}
    per_cpu = {k: samples / min(v) for k, v in cpu.items()}

    def costs(side: str, reference: str) -> dict[str, float]:
        """1 - side / reference in samples/s: best, medians, the median of pairs, CPU seconds. A pair is a
        repeat's two epochs run next to each other: the machine's drift over the run (the same epoch moves
        by 20-30 % on a shared machine) cancels within it."""
        paired = _median([a / b for a, b in zip(times[side], times[reference], strict=True)])
        return {"best": 1 - best[side] / best[reference], "median": 1 - median[side] / median[reference],
                "paired": 1 - 1 / paired, "cpu": 1 - per_cpu[side] / per_cpu[reference]}

    loader, overhead = costs("stream", "memory"), costs("memory", "minimal")
    return {"steps": steps, "samples": samples, **best, "median": median, "per_cpu_s": per_cpu,
            "cost": loader["best"], "cost_median": loader["median"], "cost_paired": loader["paired"],
            "cost_cpu": loader["cpu"], "overhead": overhead, "seconds": times, "cpu_seconds": cpu}


def _percents(costs: tuple[float, ...]) -> str:
    return " / ".join(f"{100 * c:+.1f} %" for c in costs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(p)
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="DataLoader workers per process")
    p.add_argument("--batch", type=int, default=32, help="global batch (optim.batch_size)")
    p.add_argument("--include", choices=("all", "labelled"), default="all",
                   help="the epoch's ids: the round pool (all train ids) or the labelled ones (warm-up)")
    p.add_argument("--samples", type=int, default=None, help="N of those ids at random (default: all)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved epochs of each side; the best counts")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: the trainer's, cores // processes)")
    p.add_argument("--memory-batches", type=int, default=256, help="distinct batches held in RAM, cycled")
    p.add_argument("--progress", action="store_true",
                   help="the trainer's progress bar on, as run.progress is by default (off: no bar output)")
    args = p.parse_args()

    figures: dict = {"rows": []}
    run = make_run(args, "bench_train", workers=args.workers[0], batch_size=args.batch)
    acc = run.acc
    say = print if acc.is_main_process else (lambda *a, **k: None)
    if args.progress:
        run.progress = Progress(enabled=acc.is_main_process, every_s=run.cfg.run.progress_every_s)
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        include = epoch_ids(run, args.include, args.samples)
        # unlabelled rows of the table are zeros until a round writes them: a uniform target instead
        blank = run.state.targets.sum(1) == 0
        run.state.targets[blank] = 1.0 / NUM_CLASSES
        say(f"{describe(run)}, global batch {args.batch}, augment on, {int(include.sum())} ids per epoch, "
            f"progress bar {'on' if args.progress else 'off'}", flush=True)
        for workers in args.workers:
            run.cfg.data.num_workers = workers
            r = measure(run, include, args.repeat, args.memory_batches)
            r.update(processes=acc.num_processes, workers=workers, threads=torch.get_num_threads(),
                     device=str(acc.device), backbone=args.backbone, input_size=run.net.input_spec.size,
                     mixed_precision=args.mixed_precision, batch=args.batch, include=args.include)
            figures["rows"].append(r)
            o = r["overhead"]
            say(f"  workers {workers}: {r['steps']} steps of {args.batch}, best of {args.repeat}: stream "
                f"{r['stream']:,.0f}/s, memory {r['memory']:,.0f}/s, minimal {r['minimal']:,.0f}/s; stream "
                f"cost {100 * r['cost']:+.1f} % (median {100 * r['cost_median']:+.1f} %, median of pairs "
                f"{100 * r['cost_paired']:+.1f} %, CPU {100 * r['cost_cpu']:+.1f} %; target <= 5 %); trainer "
                f"/ minimal {r['memory'] / r['minimal']:.3f} (overhead {100 * o['best']:+.1f} %, median "
                f"{100 * o['median']:+.1f} %, median of pairs {100 * o['paired']:+.1f} %, CPU "
                f"{100 * o['cpu']:+.1f} %)", flush=True)
    finally:
        close(run)
    if acc.is_main_process:
        print("\n| processes | threads each | workers each | steps | stream /s | memory /s | minimal /s "
              "| stream cost: best / median / pairs / CPU | trainer / minimal (best) "
              "| trainer overhead: best / median / pairs / CPU |\n" + "| ---: " * 7 + "| --- | ---: | --- |")
        for r in figures["rows"]:
            loader = (r["cost"], r["cost_median"], r["cost_paired"], r["cost_cpu"])
            own = tuple(r["overhead"][k] for k in ("best", "median", "paired", "cpu"))
            print(f"| {r['processes']} | {r['threads']} | {r['workers']} | {r['steps']} | "
                  f"{r['stream']:,.0f} | {r['memory']:,.0f} | {r['minimal']:,.0f} | {_percents(loader)} | "
                  f"{r['memory'] / r['minimal']:.3f} | {_percents(own)} |")
        if args.json is not None:
            args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
