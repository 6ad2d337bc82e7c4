"""bench_train runs end to end on tiny synthetic shards: the stream, RAM and minimal-loop sides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fer_dist.data.pack import pack
from fer_dist.data.sources.base import SourceOptions

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench" / "bench_train.py"


def test_bench_train_times_the_stream_the_trainer_from_ram_and_the_minimal_loop(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    pack("synthetic", [], shards, options=SourceOptions(subjects=12, frames=5), workers=1, progress=False)
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(BENCH), "--shards", str(shards), "--workers", "0",
                           "--samples", "64", "--repeat", "1", "--threads", "1", "--memory-batches", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["steps"] == 2 and row["samples"] == 64
    for side in ("stream", "memory", "minimal"):
        assert row[side] > 0 and len(row["seconds"][side]) == 1, side
    assert set(row["overhead"]) == {"best", "median", "paired", "cpu"}
    assert "trainer / minimal" in done.stdout and "| 1 | 1 | 0 | 2 |" in done.stdout, done.stdout
