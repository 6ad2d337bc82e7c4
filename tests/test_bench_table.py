"""The table benchmark runs end to end at a tiny size (CI), and its random round has what it claims."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
from bench_table import one_size, random_round  # noqa: E402

from fer_dist.dist import gathered_bytes  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench" / "bench_table.py"
STEPS = ("concat", "dedupe", "select", "rewrite", "draw")


def test_bench_table_reports_every_step_per_size(tmp_path: Path) -> None:
    out = tmp_path / "table.json"
    done = subprocess.run([sys.executable, str(BENCH), "--ids", "3000", "5000", "--world", "3",
                           "--json", str(out)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["meta"]["world"] == 3 and [r["ids"] for r in report["results"]] == [3000, 5000]
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    for line, result in zip(lines, report["results"], strict=True):
        (run,) = result["runs"]
        # the child's figures: the counts are seeded, the same as this process computes
        expected = one_size(result["ids"], 3, labelled=0.1, confident=0.3)
        assert (run["confident"], run["drawn"]) == (expected["confident"], expected["drawn"])
        assert run["table_bytes"] == result["ids"] * 7 * 4
        assert run["gathered_bytes_per_process"] == gathered_bytes(-(-result["ids"] // 3), 7, 3)
        assert run["total_seconds"] == pytest.approx(sum(run[step]["seconds"] for step in STEPS), abs=1e-4)
        assert run["peak_rss_bytes"] == max(run[step]["peak_rss_bytes"] for step in STEPS)
        for step in STEPS:
            assert run[step]["peak_rss_bytes"] >= run["start_rss_bytes"] > 0
        # the printed row is the JSON's run, figure for figure
        steps = "  ".join(f"{step} {run[step]['seconds']:.3f}s" for step in STEPS)
        gib = {k: f"{run[k] / 2**30:.2f}" for k in ("peak_rss_bytes", "start_rss_bytes")}
        assert line.split() == (f"{result['ids']:,} ids {steps} total {run['total_seconds']:.3f}s peak RSS "
                                f"{gib['peak_rss_bytes']} GiB (start {gib['start_rss_bytes']}) confident "
                                f"{run['confident']:,} drawn {run['drawn']:,}").split()


def test_the_random_round_is_a_padded_gather_of_every_id_once() -> None:
    ids, probs, labels = random_round(10, 4, labelled=0.5, confident=0.3)
    assert [p.numel() for p in ids] == [3, 3, 3, 3]  # n_max = 3: parts of 2, 3, 2, 3 padded
    real = torch.cat(ids)[torch.cat(ids) >= 0]
    assert sorted(real.tolist()) == list(range(10))
    assert torch.allclose(torch.cat(probs)[torch.cat(ids) >= 0].sum(1), torch.ones(10))
    assert ((labels >= -1) & (labels < 7)).all()


def test_one_size_draws_a_tenth_at_most_and_counts_the_gathered_bytes() -> None:
    got = one_size(4000, 2, labelled=0.5, confident=0.5)
    assert 0 < got["drawn"] <= round(0.1 * 2000 * 1.2)  # ~10 % of ~2,000 labelled
    # 2 processes x 2,000 rows of (int64 id, 7 float32), plus the sizes exchange (2 x 8 bytes per process)
    assert got["gathered_bytes_per_process"] == 2 * 2000 * (8 + 7 * 4) + 2 * 8 * 2
