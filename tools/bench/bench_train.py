"""Training throughput of the trainer's epoch with the real stream against the same epoch fed from RAM.

    .venv/bin/python tools/bench/bench_train.py [--workers 0 1 2] [--shards DIR] [--device auto|cpu]
    .venv/bin/accelerate launch --config_file launch_configs/accelerate/cpu_2proc.yaml \\
        tools/bench/bench_train.py [--workers 1]      # the quick start: 2 processes, 1 worker each

Both sides run `fer_dist.train.train_epoch`, the trainer's own loop (train_step: forward, soft-target loss,
backward, Adam step; the step log; the per-step stop-flag all-reduce), on the same model, process group,
global batch and number of steps; only the batches' source differs:
- stream: train_loader over the shards (the train split of --shards, default shards/synthetic), METHOD.md
  augmentation on, --workers DataLoader workers per process, exactly as train_epoch builds it; each timed
  epoch includes the loader's start (worker fork, first reads), which every real epoch pays.
- memory: the batches of one stream epoch, decoded and augmented beforehand and held in RAM, handed to
  train_epoch in place of the stream (train_loader is swapped for the duration), cycled for as many steps.
An epoch covers --include all (the round pool: every train id) or labelled (a warm-up epoch); --samples N
picks N of them at random. Each side runs --repeat times, interleaved (ABBA). Reported: samples/s (global,
all processes) and the stream's cost 1 - stream / memory (target: at most 5 %) from the best of each side,
the medians, and the median over repeats of each stream epoch against the memory epoch next to it (the
machine's drift cancels within a pair), and in CPU seconds.

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
from trainer_setup import add_common_options, close, cpu_seconds, describe, make_run, timed

import fer_dist.train as trainer
from fer_dist import dist
from fer_dist.classes import NUM_CLASSES
from fer_dist.data.augment import train_transform
from fer_dist.data.stream import train_loader
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
def fed_from(stream: MemoryStream):
    """train_epoch takes its batches from `stream` instead of building a train_loader."""
    real = trainer.train_loader
    trainer.train_loader = lambda *a, **k: stream
    try:
        yield
    finally:
        trainer.train_loader = real


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


def measure(run: Run, include: torch.Tensor, repeat: int, limit: int) -> dict:
    """Best-of-`repeat` global samples/s of train_epoch on the stream and from RAM, ABBA-interleaved."""
    acc, st = run.acc, run.state
    memory = prepare_memory(run, include, limit)
    steps = memory.steps
    samples = steps * (run.cfg.optim.batch_size // acc.num_processes) * acc.num_processes
    times: dict[str, list[float]] = {"stream": [], "memory": []}
    cpu: dict[str, list[float]] = {"stream": [], "memory": []}

    def epoch(name: str) -> None:
        if name == "stream":
            trainer.train_epoch(run, include, "bench")
            return
        with fed_from(memory):
            trainer.train_epoch(run, include, "bench")

    def one(name: str) -> None:
        st.step_in_epoch, st.epoch_loss = 0, 0.0
        before = cpu_seconds()
        t, _ = timed(acc, lambda: epoch(name))
        times[name].append(t)
        cpu[name].append(float(dist.all_sum(acc, cpu_seconds() - before)))  # all processes and workers

    one("memory")  # warm-up: allocator, autotuning, first-touch pages
    times["memory"].clear()
    cpu["memory"].clear()
    for i in range(repeat):
        for name in ("stream", "memory") if i % 2 == 0 else ("memory", "stream"):
            one(name)
    best = {k: samples / min(v) for k, v in times.items()}
    median = {k: samples / sorted(v)[len(v) // 2] for k, v in times.items()}
    per_cpu = {k: samples / min(v) for k, v in cpu.items()}
    # Each repeat's stream epoch against the memory epoch next to it: the machine's drift over the run
    # (the same epoch moves by 20-30 % on a shared machine) cancels within a pair.
    paired = sorted(s / m for s, m in zip(times["stream"], times["memory"], strict=True))
    return {"steps": steps, "samples": samples, "stream": best["stream"], "memory": best["memory"],
            "cost": 1 - best["stream"] / best["memory"], "median": median,
            "cost_median": 1 - median["stream"] / median["memory"],
            "cost_paired": 1 - 1 / paired[len(paired) // 2], "per_cpu_s": per_cpu,
            "cost_cpu": 1 - per_cpu["stream"] / per_cpu["memory"], "seconds": times, "cpu_seconds": cpu}


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
    args = p.parse_args()

    figures: dict = {"rows": []}
    run = make_run(args, "bench_train", workers=args.workers[0], batch_size=args.batch)
    acc = run.acc
    say = print if acc.is_main_process else (lambda *a, **k: None)
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        include = epoch_ids(run, args.include, args.samples)
        # unlabelled rows of the table are zeros until a round writes them: a uniform target instead
        blank = run.state.targets.sum(1) == 0
        run.state.targets[blank] = 1.0 / NUM_CLASSES
        say(f"{describe(run)}, global batch {args.batch}, augment on, {int(include.sum())} ids per epoch",
            flush=True)
        for workers in args.workers:
            run.cfg.data.num_workers = workers
            r = measure(run, include, args.repeat, args.memory_batches)
            r.update(processes=acc.num_processes, workers=workers, threads=torch.get_num_threads(),
                     device=str(acc.device), backbone=args.backbone, input_size=run.net.input_spec.size,
                     mixed_precision=args.mixed_precision, batch=args.batch, include=args.include)
            figures["rows"].append(r)
            say(f"  workers {workers}: {r['steps']} steps of {args.batch}, best of {args.repeat}: stream "
                f"{r['stream']:,.0f}/s, memory {r['memory']:,.0f}/s, stream cost {100 * r['cost']:+.1f} % "
                f"(median {100 * r['cost_median']:+.1f} %, median of pairs {100 * r['cost_paired']:+.1f} %; "
                f"target <= 5 %); per CPU second: stream "
                f"{r['per_cpu_s']['stream']:,.0f}, memory {r['per_cpu_s']['memory']:,.0f}, extra CPU "
                f"{100 * r['cost_cpu']:+.1f} %", flush=True)
    finally:
        close(run)
    if acc.is_main_process:
        print("\n| processes | threads each | workers each | steps | stream samples/s | memory samples/s "
              "| stream cost (best) | (median) | (median of pairs) | samples per CPU s stream / memory "
              "| stream's CPU cost |\n" + "| ---: " * 11 + "|")
        for r in figures["rows"]:
            print(f"| {r['processes']} | {r['threads']} | {r['workers']} | {r['steps']} | "
                  f"{r['stream']:,.0f} | {r['memory']:,.0f} | {100 * r['cost']:+.1f} % | "
                  f"{100 * r['cost_median']:+.1f} % | {100 * r['cost_paired']:+.1f} % | "
                  f"{r['per_cpu_s']['stream']:,.0f} / "
                  f"{r['per_cpu_s']['memory']:,.0f} | {100 * r['cost_cpu']:+.1f} % |")
        if args.json is not None:
            args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
