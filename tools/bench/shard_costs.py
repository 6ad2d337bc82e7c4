"""Per FER2013 face, the cost of each shard job feature that bench_shard.py's floor leaves out.

Each is timed apart, the garbage collector off as in the job.

    .venv/bin/python tools/bench/shard_costs.py [--src DIR] [--repeat R]

- metadata JSON: `dump_json` of each face's document (source metadata, key, alignment, id, label, class,
  split);
- tar writing: the job's shard writer (webdataset's TarWriter into a file that takes the shard's sha256 and
  each sample's CRC-32) minus the floor's fixed bytes of the same size, written and checksummed alike;
- ordering: split assignment, the seeded shuffle keys and the sort;
- listing beyond the walk: the fer2013 source's listing minus the floor's `os.walk` and sort.
The source fingerprint is timed by bench_shard.py itself (its "part: source fingerprint" row).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import bench_shard

PNG = b"p" * 1500  # a FER2013 face's PNG is ~1.5 KB
JSON = bench_shard._JSON


def best_of(repeat: int, run: Callable[[], object]) -> float:
    """The fastest of `repeat` calls, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    from fer_dist.classes import CLASSES
    from fer_dist.data.pack import FACE_OUTCOMES, write_order
    from fer_dist.data.shards import _OpenShard, dump_json
    from fer_dist.data.sources import SourceOptions, get_source
    from fer_dist.data.splits import assign_splits

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, default=bench_shard.DEFAULT_SRC,
                        help="FER2013 in image-folder form")
    parser.add_argument("--repeat", type=int, default=5, help="calls of each; the fastest counts")
    args = parser.parse_args()
    if not args.src.is_dir():
        print(f"skipped: {args.src} is absent (FER2013 image folders, see ../shared/README.md)")
        return 0
    gc.disable()
    records = get_source("fer2013")([args.src], SourceOptions()).records
    splits = assign_splits(records)
    # Each face's document as the job makes it: the source's metadata, then what _ShardsWriter.add and
    # SplitWriter.add put in (FER2013's faces are not aligned: align none).
    documents = [{**r.meta, "key": r.key, "aligned": FACE_OUTCOMES[None], "id": i, "label": r.label,
                  "class": CLASSES[r.label], "split": s}
                 for i, (r, s) in enumerate(zip(records, splits, strict=True))]

    def real_tar() -> None:
        shard = _OpenShard(Path(os.devnull), 0)
        for i in range(len(records)):
            shard.add({"__key__": f"{i:08d}", "cls": b"3", "json": JSON, "png": PNG})
        shard.close()

    def fixed_tar() -> None:
        sha256 = hashlib.sha256()
        with open(os.devnull, "wb", buffering=1 << 20) as out:
            for _ in range(len(records)):
                sample = bench_shard.fixed_sample(PNG)
                out.write(sample)
                sha256.update(sample)
                zlib.crc32(sample)

    def ordering() -> None:
        write_order(records, assign_splits(records), seed=0)

    n, r = len(records), args.repeat
    costs = {
        "metadata JSON": best_of(r, lambda: [dump_json(d) for d in documents]),
        "tar writing (beyond fixed bytes)": best_of(r, real_tar) - best_of(r, fixed_tar),
        "ordering (splits, shuffle keys, sort)": best_of(r, ordering),
        "listing beyond the walk": best_of(r, lambda: get_source("fer2013")([args.src], SourceOptions()))
        - best_of(r, lambda: bench_shard.jpeg_paths(args.src)),
    }
    print(f"FER2013: {n} faces from {args.src}; best of {r}; load average {os.getloadavg()[0]:.2f}")
    for name, seconds in costs.items():
        print(f"{name:<40}{seconds * 1e6 / n:>8.2f} us/face")
    print(f"{'sum':<40}{sum(costs.values()) * 1e6 / n:>8.2f} us/face")
    return 0


if __name__ == "__main__":
    sys.exit(main())
