"""bench_train runs end to end on tiny synthetic shards: the stream, RAM and minimal-loop sides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert (row["processes"], row["threads"], row["workers"]) == (1, 1, 0)
    assert row["steps"] == 2 and row["samples"] == 64
    for side in ("stream", "memory", "minimal"):  # samples/s: the samples over the epoch's seconds
        (seconds,) = row["seconds"][side]
        assert row[side] == pytest.approx(64 / seconds), side
    assert row["cost"] == pytest.approx(1 - row["stream"] / row["memory"])
    assert row["overhead"]["best"] == pytest.approx(1 - row["memory"] / row["minimal"])
    assert set(row["overhead"]) == {"best", "median", "paired", "cpu"}
    # the table's last line is the JSON's row: the counts, then the three rates
    cells = [c.strip() for c in done.stdout.strip().splitlines()[-1].strip("|").split("|")]
    assert cells[:4] == ["1", "1", "0", "2"], done.stdout
    assert [float(c.replace(",", "")) for c in cells[4:7]] == [round(row[s]) for s in ("stream", "memory",
                                                                                         "minimal")]
    assert cells[8] == f"{row['memory'] / row['minimal']:.3f}"
