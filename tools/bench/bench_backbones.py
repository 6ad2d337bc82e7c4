"""Training and inference images/s of dlib_resnet at its inputs against mobilenet_v2 at 48 px, same run.

    .venv/bin/python tools/bench/bench_backbones.py [--size 150 112] [--batch 32] [--steps 6] [--repeat 3]
        [--threads N]

The models are FerNet as the trainer builds them (backbone + head, the policy applied), random weights
(throughput does not depend on them), uint8 faces in (normalised in forward, as in training). Rows:
- mobilenet_v2 at 48 px, trainable all (launch_configs/train/fer2013_mobilenet_cpu.yaml);
- dlib_resnet at each --size (its own 150 px, and smaller sides down to 103 px, which cost less per face and
  up-sample a 48 px face less), trainable all and last_n_blocks:2 (frozen stages need no backward pass).
Training: forward, cross-entropy, backward, Adam step, in train mode; inference: forward in eval mode under
torch.inference_mode. Each timed window is --steps batches after one warm-up batch; the sides run
interleaved --repeat times and the best window of each is reported (the least disturbed by other load on
the machine), with the ratio to mobilenet_v2. Prints a markdown table with the machine, threads and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch
import torch.nn.functional as F

from fer_dist.models import ModelSpec, apply_trainable, build_model


def _rate(model: torch.nn.Module, size: int, batch: int, steps: int, train: bool) -> float:
    faces = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 7, (batch,))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train(train)
    start = 0.0
    for i in range(steps + 1):  # the first batch is a warm-up (allocations, kernel choice)
        if i == 1:
            start = time.perf_counter()
        if train:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(faces), labels).backward()
            opt.step()
        else:
            with torch.inference_mode():
                model(faces)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[150, 112],
                        help="dlib_resnet's input sides (103 or more)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="timed batches per window")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved windows per side")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # on a loaded machine fewer threads than cores wait less
    torch.manual_seed(0)
    rows = [("mobilenet_v2", 48, "all")] + [("dlib_resnet", size, policy) for size in args.size
                                             for policy in ("all", "last_n_blocks:2")]
    models = [build_model(ModelSpec(backbone=b, pretrained=False, input_size=s, trainable="all"))
              for b, s, _ in rows]
    for model, (_, _, policy) in zip(models, rows, strict=True):
        apply_trainable(model, policy)  # after building: from random weights build_model trains all
    best = {(i, t): 0.0 for i in range(len(rows)) for t in (True, False)}
    for _ in range(args.repeat):
        for i, ((_, size, _), model) in enumerate(zip(rows, models, strict=True)):
            for train in (True, False):
                best[i, train] = max(best[i, train], _rate(model, size, args.batch, args.steps, train))
    print(f"{platform.node()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load "
          f"{os.getloadavg()[0]:.1f}), torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, batch {args.batch}, "
          f"best of {args.repeat} windows of {args.steps} batches\n")
    print("| backbone | input | trainable | train images/s | x mobilenet_v2 | inference images/s "
          "| x mobilenet_v2 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, (backbone, size, policy) in enumerate(rows):
        tr, inf = best[i, True], best[i, False]
        print(f"| {backbone} | {size} px | {policy} | {tr:.1f} | {tr / best[0, True]:.3f} | {inf:.1f} "
              f"| {inf / best[0, False]:.3f} |")


if __name__ == "__main__":
    main()
