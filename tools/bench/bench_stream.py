"""Training-stream throughput on real FER2013 shards against two references measured in the same run.

    .venv/bin/python tools/bench/bench_stream.py [--limit N] [--workers 1 2] [--shards DIR] [--baseline DIR]

- stream: train_loader over the shards, the include mask selecting N train ids at random with a density
  of 0.9 (a round's share: X_l less 10 %) over the shards read, so skipping ids by key is measured too;
  decoded + augmented + batched in the workers.
- bound: the same PNG bytes already in RAM, the same decode (cv2.imdecode) + augmentation + batching and
  the same batch transfer (stream.pack_batch), same workers and batch: what the stream would reach if
  reading tars cost nothing.
- imagefolder: torchvision.datasets.ImageFolder over the same data set's JPEG files (N random files), the
  same transform, workers and batch size.
Targets: stream >= 90 % of the bound, and ahead of ImageFolder. Each pipeline runs --repeat times,
interleaved, and the best counts; the median over rounds of each round's stream / bound (two passes run
back to back) is printed too, steadier where the machine's speed drifts. Every pipeline's workers are
started once and kept for the later rounds, as the stream's are. Rates are given per wall second and per
CPU second (main process plus its workers).
--baseline DIR (a `git worktree` of an older commit): DIR's own bench_stream.py, importing DIR's fer_dist,
runs in a child process with the same options, its passes interleaved with these round by round (one
checkout's round, then the other's, the order swapped every round; never both at once:
baseline_stream.py), and one table gives both checkouts' rows, with this stream / the baseline's stream.
Both print the lines of their loading code (`wc -l` of fer_dist/data/{stream,shardread,plan}.py and
shardset.py or runset.py).
Skips (exit 0) where ../shared is absent.
Shards: --shards DIR, else shards/fer2013 (built with `fer-dist shard` if missing), else a fallback built
from the train JPEGs with tests/shard_fixtures.py (same contract format) when the command is unavailable.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from baseline_stream import Baseline, loading_lines, revision
from torch.utils.data import DataLoader, IterableDataset, Subset, get_worker_info
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image
from trainer_setup import cpu_seconds

from fer_dist.data import plan
from fer_dist.data.augment import InputSpec, eval_transform, train_transform
from fer_dist.data.runset import ShardSet
from fer_dist.data.shardread import decode_png, read_samples
from fer_dist.data.stream import Loaders, pack_batch, unpack_batch, worker_context

ROOT = Path(__file__).resolve().parents[2]
FER = ROOT.parent / "shared" / "data" / "fer2013"
SPEC = InputSpec(48, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # MobileNetV2 ImageNet at 48 px


def build_shards(out: Path) -> Path:
    """shards/fer2013 from `fer-dist shard`, or the fixture builder's equivalent if the command fails."""
    if (out / "manifest.json").exists():
        return out
    cmd = [str(ROOT / ".venv" / "bin" / "fer-dist"), "shard", "--dataset", "fer2013", "--src", str(FER),
           "--out", str(out)]
    print("building shards:", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode == 0 and (out / "manifest.json").exists():
        return out
    fallback = out.with_name(out.name + "-fixture")
    if (fallback / "manifest.json").exists():
        return fallback
    print(f"`fer-dist shard` failed: building {fallback} from the train JPEGs (tests/shard_fixtures.py)")
    sys.path.insert(0, str(ROOT / "tests"))
    import cv2
    from shard_fixtures import Sample, write_dir

    from fer_dist.classes import FER2013_FOLDERS

    samples = []
    for path in sorted((FER / "train").glob("*/*.jpg")):
        ok, png = cv2.imencode(".png", cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
        samples.append(Sample(FER2013_FOLDERS[path.parent.name], png.tobytes()))
    write_dir(fallback, {"train": [samples[i:i + 1000] for i in range(0, len(samples), 1000)]},
              size=48, channels=1)
    return fallback


class InMemory(IterableDataset):
    """The bound: PNG bytes in RAM, split among workers by position, decoded + augmented + batched."""

    def __init__(self, blobs: list[bytes], batch: int, transform) -> None:
        self.blobs, self.batch, self.transform = blobs, batch, transform

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        if info:
            gc.freeze()  # the same worker setup as the stream's
        mine = self.blobs[wid::nw]
        seeds = plan.sample_seeds(0, 0, np.arange(len(mine))).tolist()
        for start in range(0, len(mine) - self.batch + 1, self.batch):
            faces = []
            for j in range(start, start + self.batch):  # a seed per face, as the stream's
                torch.default_generator.manual_seed(seeds[j])
                faces.append(self.transform(decode_png(mine[j], "ram", 0)))
            yield pack_batch(faces)  # as the stream


def as_is(batch):
    """The stream's collate_fn: batches pass as the workers made them."""
    return batch


def read_image(path: str) -> torch.Tensor:
    """ImageFolder's loader: the file as a uint8 [C, H, W] tensor, as the stream's decode gives."""
    return decode_image(path, mode=ImageReadMode.UNCHANGED)


def _rate(make) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second) of one pass; CPU time is robust to a shared box."""
    tick, cpu, n = time.perf_counter(), cpu_seconds(), 0
    for batch in make():  # cpu_seconds counts the workers, alive (kept) or reaped
        n += len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)
    return n / (time.perf_counter() - tick), n / (cpu_seconds() - cpu)


def select(shards, limit: int | None, density: float) -> np.ndarray:
    """N train ids at random, `density` of the first ids read (all train ids when no limit)."""
    train_ids = np.concatenate([np.arange(s.first_run_id, s.first_run_id + s.count) for s in shards])
    span = min(len(train_ids), int(np.ceil((limit or len(train_ids)) / density)))
    rng = np.random.default_rng(0)
    return np.sort(rng.choice(train_ids[:span], int(span * density), replace=False))


def summarise(rounds: list[dict[str, tuple[float, float]]]) -> dict:
    """Best of each pipeline (wall, CPU) and the median over rounds of each round's stream / bound."""
    best = {name: tuple(max(r[name][i] for r in rounds) for i in (0, 1)) for name in rounds[0]}
    # stream / bound of each round, its two passes run back to back: steadier than best / best where the
    # machine's speed drifts between rounds
    paired = tuple(float(np.median([r["stream"][i] / r["bound"][i] for r in rounds])) for i in (0, 1))
    return {**best, "paired": paired}


def measure(shards, chosen: np.ndarray, num_ids: int, tf, workers: int, batch: int, repeat: int,
            baseline: Baseline | None = None) -> tuple[dict, dict | None]:
    """Best-of-`repeat` samples/s of the stream, the in-RAM bound and ImageFolder, run interleaved; and
    the baseline's, its rounds alternating with these."""
    include = torch.zeros(num_ids, dtype=torch.bool)
    include[torch.from_numpy(chosen)] = True
    targets = torch.zeros(num_ids, 7)
    blobs = []
    for s in shards:
        keys = chosen[(chosen >= s.first_run_id) & (chosen < s.first_run_id + s.count)] - s.offset
        blobs += [m["png"] for _, m in read_samples(s.index(), keys, ("png",))]
    folder = ImageFolder(str(FER / "train"), transform=tf, loader=read_image)
    # Every pipeline's workers start as the stream's do (from the fork server) and, like the stream's, are
    # kept from one round to the next: each pipeline pays its workers' start in the first round only.
    context = worker_context() if workers else None
    subset = Subset(folder, np.random.default_rng(0).choice(len(folder), len(chosen), replace=False).tolist())
    kept = workers > 0
    loaders = {
        "bound": DataLoader(InMemory(blobs, batch, tf), batch_size=None, num_workers=workers,
                            collate_fn=as_is, multiprocessing_context=context, persistent_workers=kept),
        "imagefolder": DataLoader(subset, batch_size=batch, shuffle=True, num_workers=workers,
                                  multiprocessing_context=context, persistent_workers=kept),
    }
    stream = Loaders(shards, num_workers=workers, train=tf)  # a run's: its workers kept from round to round
    runs = {
        "stream": lambda: stream.train(shards, include, targets, global_batch=batch, rank=0, world=1, seed=0,
                                       epoch=0),
        "bound": lambda: map(unpack_batch, loaders["bound"]),
        "imagefolder": lambda: loaders["imagefolder"],
    }
    rounds, theirs = [], []

    def ours() -> None:
        if baseline is not None:
            baseline.wait_idle()  # nothing of the baseline runs during these passes
        rounds.append({name: _rate(make) for name, make in runs.items()})

    for i in range(repeat):
        if baseline is None:
            ours()
            continue
        sides = (ours, lambda: theirs.append(baseline.round(tuple(runs))))
        for side in sides if i % 2 == 0 else sides[::-1]:
            side()
    stream.close()
    loaders.clear()  # dropped, DataLoader shuts their persistent workers down
    return summarise(rounds), (summarise(theirs) if theirs else None)


def rows(label: str, workers: int, checkout: str, r: dict, ref: dict | None) -> list[str]:
    """The table's rows of one measurement (per wall second, per CPU second)."""
    out = []
    for i, unit in enumerate(("wall s", "CPU s")):
        st, bd, fo = r["stream"][i], r["bound"][i], r["imagefolder"][i]
        vs = f"{st / ref['stream'][i]:.2f}" if ref is not None else ""
        out.append(f"| {label} | {workers} | {unit} | {checkout} | {st:,.0f} | {bd:,.0f} | {fo:,.0f} | "
                   f"{st / bd:.2f} | {r['paired'][i]:.2f} | {st / fo:.2f} | {vs} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="samples per measurement (default: all)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--density", type=float, default=0.9, help="share of the ids read that are selected")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each pipeline; the best counts")
    parser.add_argument("--shards", type=Path, default=None)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout (a git worktree): its own bench_stream, interleaved")
    args = parser.parse_args()
    if not FER.is_dir():
        print(f"skipped: {FER} is absent (the real FER2013 lives in ../shared)")
        return
    shards_dir = (args.shards or build_shards(ROOT / "shards" / "fer2013")).resolve()
    here = revision(ROOT)
    for root, name in ((ROOT, here), *(((args.baseline, None),) if args.baseline else ())):
        lines = loading_lines(root)
        print(f"loading code at {name or revision(root)} ({root}): {sum(lines.values())} lines (wc -l "
              + ", ".join(f"{k} {v}" for k, v in lines.items()) + ")")
    baseline = None
    if args.baseline is not None:
        baseline = Baseline(args.baseline, ["--workers", *map(str, args.workers), "--batch", str(args.batch),
                                            "--density", str(args.density), "--repeat", str(args.repeat),
                                            "--shards", str(shards_dir),
                                            *(["--limit", str(args.limit)] if args.limit else [])])
    shardset = ShardSet([(shards_dir, ["train"])])
    shards = shardset.shards(0)
    chosen = select(shards, args.limit, args.density)
    print(f"shards {shards_dir} ({len(shards)} tars); {len(chosen)} samples at density {args.density}; "
          f"batch {args.batch}; {SPEC}; best of {args.repeat}", flush=True)
    table = []
    for label, tf in (("augmented", train_transform(SPEC)), ("no augmentation", eval_transform(SPEC))):
        for workers in args.workers:
            r, base = measure(shards, chosen, shardset.num_ids, tf, workers, args.batch, args.repeat,
                              baseline)
            for i, unit in enumerate(("wall s", "CPU s")):
                st, bd, fo = r["stream"][i], r["bound"][i], r["imagefolder"][i]
                print(f"{label:>15}, workers {workers}, samples per {unit:6}: stream {st:6.0f}  "
                      f"bound {bd:6.0f}  imagefolder {fo:6.0f}  stream/bound {st / bd:4.2f} (median of "
                      f"rounds {r['paired'][i]:4.2f})  stream/imagefolder {st / fo:4.2f}"
                      + (f"  stream/baseline's {st / base['stream'][i]:4.2f}" if base else ""), flush=True)
            table += rows(label, workers, here, r, base)
            if base is not None:
                table += rows(label, workers, f"baseline {baseline.name}", base, None)
    if baseline is not None:
        baseline.close()
    print("\n| transform | workers | per | checkout | stream /s | bound /s | ImageFolder /s | stream / bound "
          "(best) | (median of rounds) | stream / ImageFolder | stream / baseline's |\n"
          "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(table))

if __name__ == "__main__":
    main()
