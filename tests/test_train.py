"""The trainer end to end with real processes: 2 gloo ranks via `accelerate launch`, 1 via `python -m`.

One uninterrupted 2-process run is the reference; the other tests compare against it: world-size
invariance of a round's selection and draw, a SIGKILLed run resumed, a SIGTERMed run stopped and resumed.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from train_fixtures import tiny_training

from fer_dist.checkpoint import latest_checkpoint, load_checkpoint
from fer_dist.method import should_stop
from fer_dist.metrics import read_metrics
from fer_dist.models import load_exported

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A small synthetic shard folder and a config over it (warm-up 2 epochs, 3 rounds)."""
    return tiny_training(tmp_path_factory.mktemp("train"), run={"debug": True, "keep_last": 20})


def command(workdir: Path, name: str, processes: int, *overrides: str) -> list[str]:
    args = ["--config", str(workdir / "config.yaml"), f"run.name={name}", f"run.num_processes={processes}",
            *overrides]
    if processes == 1:
        return [sys.executable, "-m", "fer_dist.train", *args]
    return [str(VENV_BIN / "accelerate"), "launch", "--config_file",
            str(REPO / "launch_configs/accelerate/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
            "-m", "fer_dist.train", *args]


def train(workdir: Path, name: str, processes: int = 2, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command(workdir, name, processes, *overrides), cwd=workdir, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def start(workdir: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen(command(workdir, name, 2), cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = TIMEOUT) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared: {proc.stdout.read()[-2000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def signal_tree(proc: subprocess.Popen, sig: int) -> None:
    """Signal the launcher and every process under it, as SLURM does to a job step.

    torchrun starts each worker in a session of its own, so signalling the launcher's group would miss them.
    """
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def final_state(run_dir: Path) -> dict:
    state, _ = load_checkpoint(latest_checkpoint(run_dir), 0)
    return state


def comparable(history: list[dict]) -> list[dict]:
    """The history without wall-clock timings, which differ between any two runs."""
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in history]


def assert_same_run(a: dict, b: dict) -> None:
    assert torch.equal(a["state"]["targets"], b["state"]["targets"])
    assert a["state"]["round"] == b["state"]["round"] and a["state"]["step"] == b["state"]["step"]
    ha, hb = comparable(a["state"]["history"]), comparable(b["state"]["history"])
    assert len(ha) == len(hb)
    for x, y in zip(ha, hb, strict=True):
        sx, sy = x.pop("selection", None), y.pop("selection", None)
        assert x == y
        if sx is not None:
            assert all(torch.equal(sx[k], sy[k]) for k in ("confident", "removed", "added"))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.fixture(scope="module")
def reference(workdir: Path) -> Path:
    """The uninterrupted 2-process run."""
    train(workdir, "reference", 2)
    return workdir / "runs" / "reference"


def test_two_processes_warm_up_rounds_stop_export(reference: Path):
    summary = yaml.safe_load((reference / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["warmup_epochs"] == 2 and summary["rounds"] == 3
    assert summary["stop_reason"] == "max_rounds (3)"
    records = read_metrics(reference / "metrics.jsonl")
    rounds = [r for r in records if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert 0.0 <= r["val/acc"] <= 1.0
        assert r["unlabelled/drawn"] <= r["unlabelled/confident"]
        assert sum(r["unlabelled/class_hist"]) == r["unlabelled/drawn"]
        assert r["gather/bytes"] > 0 and r["time/predict"] >= 0
    assert [r["warmup"] for r in records if r["kind"] == "warmup"] == [1, 2]
    assert any(r["kind"] == "step" for r in records)
    # the exported best model rebuilds without the training code's state
    net = load_exported(reference / "best")
    assert net(torch.zeros(2, 1, 48, 48)).shape == (2, 7)
    state = final_state(reference)
    assert state["world_size"] == 2 and state["state"]["phase"] == "done"
    drawn = [h["selection"]["added"] for h in state["state"]["history"] if h["kind"] == "round"]
    assert any(d.numel() for d in drawn), "no round drew an unlabelled sample: the test shows nothing"


def test_prediction_selection_and_draw_do_not_depend_on_world_size(workdir: Path, reference: Path):
    start_from = reference / "checkpoints" / "warmup-0002"
    for name, processes in (("one", 1), ("two", 2)):
        train(workdir, name, processes, f"run.resume={start_from}", "run.stop_after_rounds=1")
    one, two = (final_state(workdir / "runs" / n) for n in ("one", "two"))
    ref_round1 = load_checkpoint(reference / "checkpoints" / "round-0001", 0)[0]
    for state in (one, two):
        assert state["state"]["round"] == 1
        picked = state["state"]["history"][-1]["selection"]
        expected = ref_round1["state"]["history"][-1]["selection"]
        for key in ("confident", "removed", "added"):
            assert torch.equal(picked[key], expected[key]), key
    # the table is rewritten from float predictions of differently batched passes: equal to rounding
    torch.testing.assert_close(one["state"]["targets"], two["state"]["targets"], rtol=0, atol=1e-5)


def test_killed_run_resumes_to_the_same_end(workdir: Path, reference: Path):
    proc = start(workdir, "killed")
    latest = workdir / "runs" / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + TIMEOUT
    # kill once `latest` names round 1: the resume then starts from a round, with trained BatchNorm stats
    while not (latest.exists() and latest.read_text().strip() == "round-0001"):
        assert proc.poll() is None and time.monotonic() < deadline, "round-0001 never became the latest"
        time.sleep(0.02)
    signal_tree(proc, signal.SIGKILL)
    proc.wait(timeout=30)
    result = train(workdir, "killed", 2)  # resume: auto is the default
    assert "resumed from" in result.stderr and "round-0001" in result.stderr
    assert_same_run(final_state(workdir / "runs" / "killed"), final_state(reference))
    ref = [r for r in read_metrics(reference / "metrics.jsonl") if r["kind"] != "step"]
    got = [r for r in read_metrics(workdir / "runs" / "killed" / "metrics.jsonl") if r["kind"] != "step"]
    assert comparable(got) == comparable(ref)


def test_sigterm_saves_together_exits_cleanly_and_resumes(workdir: Path, reference: Path):
    proc = start(workdir, "stopped")
    run_dir = workdir / "runs" / "stopped"
    wait_for(run_dir / "checkpoints" / "warmup-0001" / "meta.json", proc)
    signal_tree(proc, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert "stopped on request" in output, output[-2000:]
    stopped_at = latest_checkpoint(run_dir)
    assert stopped_at.name.startswith("step-"), stopped_at
    train(workdir, "stopped", 2)
    assert_same_run(final_state(run_dir), final_state(reference))


def test_moving_average_rule_stops_the_run(workdir: Path):
    """With T = 1 the run must stop at the first round whose accuracy falls (or run to max_rounds)."""
    train(workdir, "stopping", 1, "method.stop_window=1", "method.max_rounds=5", "method.warmup_epochs=1")
    state = final_state(workdir / "runs" / "stopping")["state"]
    accs = [h["val/acc"] for h in state["history"] if h["kind"] == "round"]
    first_fall = next((t for t in range(2, len(accs) + 1) if should_stop(accs[:t], 1)), None)
    if first_fall is None:
        assert len(accs) == 5 and state["stop_reason"] == "max_rounds (5)"
    else:
        assert len(accs) == first_fall and state["stop_reason"].startswith("moving average")
    summary = yaml.safe_load((workdir / "runs" / "stopping" / "summary.json").read_text())
    assert summary["rounds"] == len(accs) and summary["processes"] == 1
