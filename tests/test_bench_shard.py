"""The sharding benchmarks run end to end (on a generated FER2013 tree, so CI needs no data set)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from layouts import make_fer2013_folders

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench" / "bench_shard.py"
ROW = r"\s+5\s+\d+\s+[\d.]+\s+[\d.]+"  # images, images/s, us/image, vs bound


def test_bench_shard_reports_every_measurement_and_the_verdicts(tmp_path: Path) -> None:
    src = make_fer2013_folders(tmp_path / "fer2013")
    done = subprocess.run([sys.executable, str(BENCH), "--src", str(src), "--workers", "1,2"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for name in ("bound: decode \\+ PNG encode in RAM, 1 core", "bound: the same on 2 cores at once",
                 "floor: walk, read, codec, write \\+ checksums", "part: listing", "part: writing shards",
                 "pipeline: fer-dist shard --workers 1", "pipeline: fer-dist shard --workers 2"):
        # The 2-core bound counts each image once per process.
        assert re.search(name + r".*?" + (r"\s+10\s" if "2 cores" in name else ROW), out), (name, out)
    assert re.search(r"workers=1 / bound = \d+% \(wall clock; (meets|misses) the 70% target\)", out), out
    left = r"floor / bound = \d+%: at 70% of the bound, -?[\d.]+ us per image are left for the job's own"
    assert re.search(left + r" Python \(it spends -?[\d.]+\)", out), out
    assert re.search(r"workers=2 / workers=1 = [\d.]+x", out), out


def test_shard_costs_times_each_feature(tmp_path: Path) -> None:
    src = make_fer2013_folders(tmp_path / "fer2013")
    costs = BENCH.with_name("shard_costs.py")
    done = subprocess.run([sys.executable, str(costs), "--src", str(src), "--repeat", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("metadata JSON", "tar writing", "ordering", "listing beyond the walk", "sum"):
        assert re.search(rf"^{name}.*\s-?[\d.]+ us/face$", done.stdout, re.MULTILINE), (name, done.stdout)
