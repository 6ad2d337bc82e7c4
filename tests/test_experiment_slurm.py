"""`fer-dist experiment submit` against the real Slurm of tests/test_slurm.py (its `cluster` fixture: munge,
slurmctld and two one-CPU slurmd nodes on this host): a tiny synthetic experiment with a shared warm-up is
submitted as a warm-up job and an array of two arms that waits for it; the two arms run as concurrent tasks
on the two nodes and both records land in the one records file. Skipped where Slurm cannot run here."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_slurm import Cluster, cluster  # noqa: F401  (the module fixture: the daemons, stopped after)
from train_fixtures import write_config

from fer_dist.experiments.records import read_records

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("launch")]
FER_DIST = Path(sys.executable).parent / "fer-dist"


def _experiment(root: Path, shards: Path) -> Path:
    write_config(root, shards, data={"num_workers": 0})
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "base": str(root / "config.yaml"), "seeds": [0], "shared_warmup": True,
        "schedule": {"method.warmup_epochs": 2, "method.max_rounds": 1},
        "test": [{"dir": str(shards), "splits": ["test"]}],
        "arms": {"fixed": {"method.tau": 0.3}, "adaptive": {"method.threshold": "class_adaptive"}},
    }, sort_keys=False))
    return path


def _tasks(c: Cluster, job: str) -> list[dict[str, str]]:
    """`scontrol show job -o` of an array: one dict per task."""
    out = c.run("scontrol", "show", "job", "-o", job).stdout
    return [dict(item.split("=", 1) for item in line.split() if "=" in item) for line in out.splitlines()]


@pytest.mark.timeout(900)
def test_two_arms_run_as_concurrent_array_tasks_after_their_warmup_and_both_records_land(
        cluster: Cluster, small_shards: Path, tmp_path: Path) -> None:  # noqa: F811
    path = _experiment(tmp_path, small_shards)
    env = {**cluster.env, "FER_DIST_PYTHON": sys.executable, "FER_DIST_REPO": str(tmp_path)}
    done = subprocess.run(
        [str(FER_DIST), "experiment", "submit", str(path), "--runs-dir", "runs", "--results-dir", "results",
         "--output", str(tmp_path / "%x-%A_%a.out"), "--script-dir", "scripts", "--cpus-per-task", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ids = {line.split()[1].rstrip(":"): line.split()[3] for line in done.stdout.splitlines()
           if line.startswith("submitted ")}
    warm, arms = ids["tiny-warmup-s0"], ids["tiny-s0"]
    assert f"afterok:{warm}" in cluster.run("scontrol", "show", "job", "-o", arms).stdout
    deadline = time.monotonic() + 800
    while len(read_records(tmp_path / "results" / "tiny.json")) < 2:
        states = {t.get("JobState") for t in _tasks(cluster, warm) + _tasks(cluster, arms)}
        logs = "".join(p.read_text()[-1500:] for p in tmp_path.glob("*.out"))
        assert not states & {"FAILED", "CANCELLED", "TIMEOUT"}, logs
        assert time.monotonic() < deadline, f"{states}: {logs}"
        time.sleep(1)
    records = read_records(tmp_path / "results" / "tiny.json")
    assert sorted(r["arm"] for r in records) == ["adaptive", "fixed"]
    assert all(r["rounds"] == 1 and r["warmup_run"] == "runs/tiny/warmup-fixed-s0" for r in records)
    # the warm-up ended before either arm started, and the two arms overlapped in time (one per node)
    warm_end = _tasks(cluster, warm)[0]["EndTime"]
    tasks = _tasks(cluster, arms)
    assert len(tasks) == 2 and all(t["StartTime"] >= warm_end for t in tasks)
    assert max(t["StartTime"] for t in tasks) < min(t["EndTime"] for t in tasks), tasks
    assert {t["NodeList"] for t in tasks} == {"node1", "node2"}
    for log in tmp_path.glob("tiny-s0-*.out"):
        assert "rounds start from the warm-up of runs/tiny/warmup-fixed-s0" in log.read_text()
