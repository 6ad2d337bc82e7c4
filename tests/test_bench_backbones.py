"""The backbone benchmark runs end to end at a tiny size: a row per backbone, input and trainable policy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench" / "bench_backbones.py"


def test_bench_backbones_has_a_row_per_dlib_input_and_policy_beside_mobilenet() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--size", "150", "103", "--batch", "2", "--steps", "1",
                           "--repeat", "1", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    table = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ") and "px" in line]
    rows = [cells[:3] for cells in table]
    assert rows == [["| mobilenet_v2", "48 px", "all"], ["| dlib_resnet", "150 px", "all"],
                    ["| dlib_resnet", "150 px", "last_n_blocks:2"], ["| dlib_resnet", "103 px", "all"],
                    ["| dlib_resnet", "103 px", "last_n_blocks:2"]]
    assert float(table[0][4]) == 1.0  # each row's ratio is to mobilenet_v2's rate of the same run
    assert all(float(cells[3]) > 0 and float(cells[5]) > 0 for cells in table)
