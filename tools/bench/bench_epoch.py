"""What an epoch of the training stream costs around and per batch, in one process, with 0..N workers.

    .venv/bin/python tools/bench/bench_epoch.py [--shards shards/synthetic] [--workers 0 1] [--epochs 6]
        [--batch 16] [--no-augment]

For each worker count: train_loader over the train split (augmented, global batch 16, one rank), --epochs
epochs; per epoch the time from building the stream to its first batch, the batches, and the time from the
last batch to the end of the iteration; and, over the epochs after the first, CPU per batch of this
process and of its loader workers. With workers, twice: the workers kept from epoch to epoch (as the
trainer's `Loaders` run) and restarted every epoch (a one-pass `train_loader` each: how every epoch ran
before the workers were kept). The first epoch also pays the fork server's start (seconds, once per process).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from trainer_setup import ROOT, cpu_seconds

from fer_dist.data.augment import InputSpec, eval_transform, train_transform
from fer_dist.data.runset import ShardSet, read_labels
from fer_dist.data.stream import Loaders, train_loader


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(shards, labels: torch.Tensor, workers: int, epochs: int, transform, batch: int,
            restart: bool) -> None:
    include, targets = labels >= -1, torch.zeros(labels.numel(), 7)
    how = f"workers {workers}" + ("" if not workers else ", restarted" if restart else ", kept")
    batches, own, every = 0, 0.0, 0.0
    kept = Loaders(shards, num_workers=workers, train=transform)  # a run's: workers kept from epoch to epoch
    for epoch in range(epochs):
        if epoch == 1:
            own, every = own_cpu(), cpu_seconds()
        tick = time.perf_counter()
        plan = {"global_batch": batch, "rank": 0, "world": 1, "seed": 0, "epoch": epoch}
        stream = (train_loader(shards, include, targets, transform=transform, num_workers=workers, **plan)
                  if restart else kept.train(shards, include, targets, **plan))
        first = last = None
        n = 0
        for _ in stream:
            last = time.perf_counter()
            first = first or last
            n += 1
        end = time.perf_counter()
        batches += n if epoch else 0
        print(f"{how} epoch {epoch}: first batch after {1e3 * (first - tick):7.1f} ms, {n} batches "
              f"in {1e3 * (last - first):6.1f} ms, end {1e3 * (end - last):5.1f} ms, "
              f"{n * batch / (end - tick):,.0f} samples/s", flush=True)
    main_cpu, all_cpu = own_cpu() - own, cpu_seconds() - every
    workers_cpu = max(0.0, all_cpu - main_cpu)  # 0 without workers, whatever the clocks' rounding
    print(f"{how}, epochs 1-{epochs - 1}: CPU per batch of {batch}: this process "
          f"{1e3 * main_cpu / batches:.2f} ms, its workers {1e3 * workers_cpu / batches:.2f} ms\n")
    kept.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=ROOT / "shards" / "synthetic")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16, help="global batch (one rank)")
    parser.add_argument("--no-augment", action="store_true", help="the eval transform instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shardset = ShardSet([(args.shards, ["train"])])
    labels = read_labels(shardset)
    spec = InputSpec(48, 1, (0.5,), (0.5,))
    transform = eval_transform(spec) if args.no_augment else train_transform(spec)
    for workers in args.workers:
        for restart in (False, True) if workers else (False,):
            measure(shardset.shards(0), labels, workers, args.epochs, transform, args.batch, restart)


if __name__ == "__main__":
    main()
