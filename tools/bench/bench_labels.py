"""The label pass (`checked_labels` of fer_dist/data/runset.py: each sample's CRC-32 checked, its label
read), timed.

    .venv/bin/python tools/bench/bench_labels.py [DIR] [--repeat 3] [--against REV]

Times `checked_labels` over every split of a shard directory (default shards/fer2013), the shard indexes
dropped before each repetition (a run's label pass is the first to index its shards), best of --repeat.
With --against REV, the label pass as committed in REV (runset.py, or integrity.py before it) is timed
too, in the same process, alternating with the working tree's; both must return the same labels. Warm
page cache: one untimed pass first. Wall and CPU time (this process's) are printed: on a loaded machine
the CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import torch

from fer_dist.data import runset, shardread
from fer_dist.data.runset import ShardSet, load_manifest


def _module_at(rev: str):
    """The label pass's module as committed in `rev`, imported under another name (its imports resolve as
    now): runset.py, or integrity.py at revisions before the two merged."""
    root = Path(__file__).resolve().parents[2]
    for name in ("runset.py", "integrity.py"):
        shown = subprocess.run(["git", "show", f"{rev}:fer_dist/data/{name}"], cwd=root, capture_output=True,
                               text=True)
        if shown.returncode == 0:
            break
    else:
        sys.exit(f"{rev}: no fer_dist/data/runset.py nor integrity.py")
    source = shown.stdout
    spec = importlib.util.spec_from_loader(f"integrity_{rev}", loader=None)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    exec(compile(source, f"{rev}:{name}", "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", nargs="?", default="shards/fer2013")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--against", help="a git revision whose label pass is timed too")
    args = parser.parse_args()
    splits = list(load_manifest(Path(args.directory)).splits)
    shardset = ShardSet([(args.directory, splits)])
    versions = {"now": runset}
    if args.against:
        versions[args.against] = _module_at(args.against)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in versions}  # (wall, CPU) s
    labels = {}
    for name, module in versions.items():  # warms the page cache
        labels[name] = module.checked_labels(shardset).labels
    if not all(torch.equal(v, labels["now"]) for v in labels.values()):
        sys.exit("the versions' labels differ")
    for _ in range(args.repeat):
        for name, module in versions.items():
            shardread._INDEXES.clear()
            start, cpu = time.perf_counter(), time.process_time()
            module.checked_labels(shardset)
            times[name].append((time.perf_counter() - start, time.process_time() - cpu))
    print(f"{args.directory}: {shardset.num_ids} samples, splits {', '.join(splits)}")
    for name, ts in times.items():
        runs = ", ".join(f"{wall:.2f}" for wall, _ in ts)
        print(f"{name:>10}: wall best {min(ts)[0]:.2f} s of {runs}; CPU best {min(c for _, c in ts):.2f} s")


if __name__ == "__main__":
    main()
