"""The trainer end to end with real processes: 2 gloo ranks via `accelerate launch`, 1 via `python -m`.

One uninterrupted 2-process run is the reference (conftest's train_reference, shared with
tests/test_slurm.py); the other tests compare against it: world-size invariance of a round's selection and
draw, a SIGKILLed run resumed, a SIGTERMed run stopped and resumed.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from train_fixtures import REFERENCE_SECTIONS, env, tiny_training, train_command, trained

from fer_dist.checkpoint_files import latest_checkpoint, load_checkpoint
from fer_dist.classes import NUM_CLASSES
from fer_dist.data.manifest import read_manifest
from fer_dist.dist import gathered_bytes
from fer_dist.metrics import read_metrics
from fer_dist.models import load_exported

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("launch")]
TIMEOUT = 240


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, synthetic_shards: Path) -> Path:
    """The reference's config (warm-up 2 epochs, 3 rounds), with runs under a folder of this module's."""
    return tiny_training(tmp_path_factory.mktemp("train"), synthetic_shards, **REFERENCE_SECTIONS)


def command(workdir: Path, name: str, processes: int, *overrides: str, inject: bool = False) -> list[str]:
    return train_command(workdir / "config.yaml", processes, f"run.name={name}", *overrides, inject=inject)


def train(workdir: Path, name: str, processes: int = 2, *overrides: str) -> subprocess.CompletedProcess:
    return trained(command(workdir, name, processes, *overrides), workdir, TIMEOUT)


def start(workdir: Path, name: str, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(command(workdir, name, 2, *overrides), cwd=workdir, stdout=subprocess.PIPE,
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
def reference(train_reference: Path) -> Path:
    """The uninterrupted 2-process run."""
    return train_reference


def test_two_processes_warm_up_rounds_stop_export(reference: Path, synthetic_shards: Path):
    summary = yaml.safe_load((reference / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["warmup_epochs"] == 2 and summary["rounds"] == 3
    assert summary["stop_reason"] == "max_rounds (3)"
    records = read_metrics(reference / "metrics.jsonl")
    rounds = [r for r in records if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    state = final_state(reference)
    history = [h for h in state["state"]["history"] if h["kind"] == "round"]
    splits = read_manifest(synthetic_shards).splits
    n_val, n_train = splits["val"].labelled, splits["train"].count
    for r, h in zip(rounds, history, strict=True):
        assert r["val/acc"] == h["val/acc"]  # the log and the checkpoint agree
        assert (r["val/acc"] * n_val) == pytest.approx(round(r["val/acc"] * n_val))  # a count of n_val
        assert r["unlabelled/drawn"] <= r["unlabelled/confident"]
        assert sum(r["unlabelled/class_hist"]) == r["unlabelled/drawn"] == h["selection"]["added"].numel()
        # every train id's prediction, padded to the larger of the 2 ranks' parts: n_max rows each
        fixed = gathered_bytes(0, NUM_CLASSES, 2)
        n_max = (r["gather/bytes"] - fixed) / (gathered_bytes(1, NUM_CLASSES, 2) - fixed)
        assert n_max == int(n_max) and -(-n_train // 2) <= n_max <= n_train, r["gather/bytes"]
        assert r["time/predict"] >= 0
    assert [r["warmup"] for r in records if r["kind"] == "warmup"] == [1, 2]
    assert any(r["kind"] == "step" for r in records)
    # the exported best model rebuilds without the training code's state
    net = load_exported(reference / "best")
    assert net(torch.zeros(2, 1, 48, 48)).shape == (2, 7)
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
    proc = start(workdir, "stopped", "data.num_workers=1")  # the loader workers get the signal too
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
    """Validation accuracies scripted (tests/fault_inject.py val-accs): warm-up 0.5, rounds 0.6, 0.7, 0.65,
    0.5. With T = 2 the moving averages are 0.65, 0.675, 0.575: the rule must stop at round 4 of 6 (T = 1
    would have stopped at round 3, no rule at 6)."""
    done = subprocess.run(
        command(workdir, "stopping", 1, "method.stop_window=2", "method.max_rounds=6",
                "method.warmup_epochs=1", inject=True),
        cwd=workdir, capture_output=True, text=True, timeout=TIMEOUT,
        env=env(FER_DIST_FAULT="val-accs:0.5,0.6,0.7,0.65,0.5"))
    assert done.returncode == 0, done.stderr[-3000:]
    state = final_state(workdir / "runs" / "stopping")["state"]
    assert [h["val/acc"] for h in state["history"] if h["kind"] == "round"] == [0.6, 0.7, 0.65, 0.5]
    assert state["stop_reason"] == "moving average of 2 rounds fell"
    summary = yaml.safe_load((workdir / "runs" / "stopping" / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["processes"] == 1
    assert summary["stop_reason"] == "moving average of 2 rounds fell"
