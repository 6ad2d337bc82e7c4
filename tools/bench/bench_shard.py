"""Benchmark `fer-dist shard` on the real FER2013 against the one-core decode + encode bound.

    .venv/bin/python tools/bench/bench_shard.py [--limit N] [--workers 1,2] [--repeat R]

The bound, measured in the same run on the same files: every file's bytes read into RAM first, then
cv2.imdecode + cv2.imencode(".png") per image on one core, no file I/O. The pipeline is the whole `pack()`
call (listing, splitting, the pool, tar writing, checksums, manifest), timed wall clock in a fresh process.
Two parts of the single-core time are shown apart: listing the source, and the per-image work with its
file reads. Targets: the pipeline at --workers 1 reaches at least 70 % of the bound; the workers=2 /
workers=1 ratio shows the scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from fer_dist.data.pack import ImageParams, pack, process_image
from fer_dist.data.sources import SourceOptions, get_source

DEFAULT_SRC = Path(__file__).resolve().parents[3] / "shared" / "data" / "fer2013"
TARGET = 0.70


def image_files(src: Path, limit: int | None) -> list[Path]:
    """The JPEGs, sorted; with a limit, that many spread evenly over the sorted list (every split)."""
    files = sorted(p for p in src.rglob("*.jpg") if p.is_file())
    if limit is not None and limit < len(files):
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    return files


def linked_subset(src: Path, files: list[Path], into: Path) -> Path:
    """A tree of symlinks to `files` in their original layout, so pack sees a smaller FER2013."""
    for f in files:
        link = into / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f)
    return into


def bound(files: list[Path], repeat: int) -> float:
    """Images per second of decode + PNG encode in memory on one core (best of `repeat`)."""
    blobs = [np.fromfile(f, dtype=np.uint8) for f in files]
    cv2.setNumThreads(1)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for blob in blobs:
            cv2.imencode(".png", cv2.imdecode(blob, cv2.IMREAD_UNCHANGED))
        best = min(best, time.perf_counter() - start)
    return len(blobs) / best


def pipeline(src: Path, out: Path, workers: int, repeat: int) -> tuple[float, int]:
    """Images per second of the whole pack() call (best of `repeat`), and the faces written.

    Each run is a fresh process, so every run pays the worker pool's start as a `fer-dist shard` does.
    """
    best, count = float("inf"), 0
    for _ in range(repeat):
        command = [sys.executable, __file__, "--child", str(src), str(out), str(workers)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        seconds, count = json.loads(done.stdout)
        best = min(best, seconds)
    return count / best, count


def child(src: str, out: str, workers: str) -> None:
    """One timed pack() call; prints [seconds, faces] as JSON."""
    start = time.perf_counter()
    summary = pack("fer2013", [Path(src)], Path(out), workers=int(workers), overwrite=True, progress=False)
    print(json.dumps([time.perf_counter() - start, summary.manifest.num_ids]))


def parts(src: Path, repeat: int) -> list[tuple[str, float, int]]:
    """Where the single-core time goes: listing the source, and per-image work including file reads."""
    best_list = best_work = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        records = get_source("fer2013")([src], SourceOptions()).records
        best_list = min(best_list, time.perf_counter() - start)
        params = ImageParams(48, 1, "none")
        start = time.perf_counter()
        for record in records:
            process_image(record.load, params)
        best_work = min(best_work, time.perf_counter() - start)
    n = len(records)
    return [("part: listing (fer2013 source)", n / best_list, n),
            ("part: read + decode + align + encode, 1 core", n / best_work, n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="FER2013 in image-folder form")
    parser.add_argument("--limit", type=int, default=None, help="use N images spread over the set")
    parser.add_argument("--workers", default="1,2", help="worker counts to time, comma-separated")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the best counts")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    if not args.src.is_dir():
        print(f"skipped: {args.src} is absent (FER2013 image folders, see ../shared/README.md)")
        return 0
    workers = [int(w) for w in args.workers.split(",")]
    files = image_files(args.src, args.limit)
    print(f"FER2013: {len(files)} images from {args.src}; {os.cpu_count()} cores; repeat {args.repeat}")
    with tempfile.TemporaryDirectory(prefix="bench_shard-") as tmp:
        src = args.src if args.limit is None else linked_subset(args.src, files, Path(tmp) / "src")
        rows = [("bound: decode + PNG encode in RAM, 1 core", bound(files, args.repeat), len(files))]
        rows += parts(src, args.repeat)
        for w in workers:
            rate, count = pipeline(src, Path(tmp) / "out", w, args.repeat)
            rows.append((f"pipeline: fer-dist shard --workers {w}", rate, count))
        shutil.rmtree(Path(tmp) / "out", ignore_errors=True)
    limit = rows[0][1]
    print(f"\n{'measurement':<46}{'images':>8}{'images/s':>11}{'vs bound':>10}")
    for name, rate, count in rows:
        print(f"{name:<46}{count:>8}{rate:>11.0f}{rate / limit:>10.2f}")
    rates = dict(zip(workers, (r for _, r, _ in rows[3:]), strict=True))
    if 1 in rates:
        verdict = "meets" if rates[1] >= TARGET * limit else "misses"
        print(f"\nworkers=1 / bound = {rates[1] / limit:.0%} ({verdict} the {TARGET:.0%} target)")
        for w in workers:
            if w != 1:
                print(f"workers={w} / workers=1 = {rates[w] / rates[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
