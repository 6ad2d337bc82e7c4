"""Faults injected for real into real training processes: a process SIGKILLed mid-epoch, mid-gather and
mid-checkpoint, a hung one (SIGSTOP), a crash between a checkpoint's write and its rename, a torn state.pt,
NaN losses, non-finite weights. Each run is tiny (train_fixtures.py); the moment of the fault is chosen by
tests/fault_inject.py, the fault itself (a signal, a NaN) is real.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from shard_fixtures import damage_pngs
from train_fixtures import (
    INJECT,
    env,
    free_port,
    kill_tree,
    ranks_of,
    run,
    train_command,
    write_config,
)

from fer_dist.checkpoint_files import LATEST, TMP, latest_checkpoint, load_checkpoint
from fer_dist.errors import FerDistError

pytestmark = pytest.mark.slow
TIMEOUT_S = 10  # run.collective_timeout_s of the hung-process test
AGENT_GRACE_S = 30  # torch's elastic agent: SIGTERM, then SIGKILL after this long


@pytest.fixture(scope="module")
def root(tmp_path_factory, small_shards: Path) -> Path:
    """The config of conftest's fault_references, with runs under a folder of this module's."""
    root = tmp_path_factory.mktemp("faults")
    write_config(root, small_shards)
    return root


def config(root: Path) -> Path:
    return root / "config.yaml"


def final_state(run_dir: Path) -> dict:
    state, _ = load_checkpoint(latest_checkpoint(run_dir), 0)
    return state


def assert_same_end(a: dict, b: dict) -> None:
    """Same target table, history and weights: the resumed run is the uninterrupted one."""
    assert torch.equal(a["state"]["targets"], b["state"]["targets"])
    assert [h["val/acc"] for h in a["state"]["history"]] == [h["val/acc"] for h in b["state"]["history"]]
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor.float(), b["model"][name].float(), atol=1e-5), name


# the tests that start 2 ranks: a launch slot each (conftest.py)
launches = pytest.mark.xdist_group("launch")


# ---------------------------------------------------------------- a crash while a checkpoint is written


@pytest.mark.parametrize("fault", ["kill-before-rename", "kill-mid-state"])
def test_crash_while_checkpointing_keeps_the_previous_one_and_resumes(root: Path, fault_reference_1: Path,
                                                                     fault: str):
    name = f"crash-{fault}"
    ckpts = root / "runs" / name / "checkpoints"
    done = run(train_command(config(root), 1, f"run.name={name}", inject=True), root,
               FER_DIST_FAULT=f"{fault}:warmup-0002")
    assert done.returncode == -9, done.stderr[-2000:]  # really killed, in the middle of the save
    half = ckpts / f"{TMP}warmup-0002"
    assert (half / "state.pt").is_file()  # the new checkpoint lies there, whole or torn, under its tmp name
    if fault == "kill-mid-state":
        with pytest.raises(FerDistError, match="not a loadable fer-dist checkpoint"):
            load_checkpoint(half, 0)
    assert (ckpts / LATEST).read_text().strip() == "warmup-0001"
    assert latest_checkpoint(ckpts.parent) == ckpts / "warmup-0001"  # never the half-written one
    load_checkpoint(ckpts / "warmup-0001", 0)  # intact
    resumed = run(train_command(config(root), 1, f"run.name={name}"), root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpts / 'warmup-0001'}" in resumed.stderr
    assert not list(ckpts.glob(f"{TMP}*"))  # the leftover is cleared by the next save
    assert_same_end(final_state(ckpts.parent), final_state(fault_reference_1))


# ---------------------------------------------------------------- damaged samples


def test_damaged_samples_are_skipped_and_counted_or_named(tmp_path: Path, small_shards: Path) -> None:
    """Issue 14: data.on_error=raise (the default) names the first damaged sample in one line; skip leaves
    them out, says so and counts them in the metrics."""
    shards = shutil.copytree(small_shards, tmp_path / "shards")
    keys = damage_pngs(shards, 2)
    cfg = write_config(tmp_path, shards, method={"warmup_epochs": 1, "self_training": False})
    refused = run(train_command(cfg, 1, "run.name=raise"), tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {shards / 'train-000000.tar'}: sample {keys[0]} differs from the manifest's digest (damaged "
        "after sharding)")
    skipped = run(train_command(cfg, 1, "run.name=skip", "data.on_error=skip"), tmp_path)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "data.on_error=skip: left out 2 damaged sample(s) or shard(s), the first: " in skipped.stderr
    records = [json.loads(line) for line in (tmp_path / "runs/skip/metrics.jsonl").read_text().splitlines()]
    assert any(r.get("data/skipped") == 2 for r in records)


# ---------------------------------------------------------------- numerical faults


@launches
def test_nonfinite_steps_are_skipped_then_the_run_stops(root: Path):
    name = "nan"
    done = run(train_command(config(root), 2, f"run.name={name}", "optim.max_nonfinite_steps=1", inject=True),
               root, FER_DIST_FAULT="nan-at-steps:2,5", FER_DIST_FAULT_RANK="0")
    # rank 0's NaN reaches both ranks' gradients through DDP: both skip step 2, both stop at step 5
    assert done.returncode == 1, done.stderr[-3000:]
    assert "step 2: non-finite loss nan or gradient norm nan: step skipped (1 of at most 1)" in done.stderr
    assert "optim.max_nonfinite_steps: 2 steps had a non-finite loss or gradient (the last at step 5" \
        in done.stderr
    ckpts = root / "runs" / name / "checkpoints"
    saved = [p for p in ckpts.iterdir() if (p / "state.pt").is_file()]
    assert saved  # warmup-0001, after the skipped step 2
    for path in saved:
        for tensor in load_checkpoint(path, 0)[0]["model"].values():
            assert torch.isfinite(tensor).all(), path


def test_one_process_nonfinite_limit_is_one_line_exit_2(root: Path):
    done = run(train_command(config(root), 1, "run.name=nan1", "optim.max_nonfinite_steps=0", inject=True),
               root, FER_DIST_FAULT="nan-at-steps:2")
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: optim.max_nonfinite_steps: 1 steps had a non-finite loss or gradient")


def test_nonfinite_weights_are_never_checkpointed(root: Path):
    """An infinite learning rate: Adam's first step makes the weights non-finite; nothing is saved."""
    done = run(train_command(config(root), 1, "run.name=inf", "optim.lr=.inf",
                             "optim.max_nonfinite_steps=100"), root)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "refusing to save non-finite weights" in done.stderr.strip().splitlines()[-1]
    ckpts = root / "runs" / "inf" / "checkpoints"
    assert not [p for p in ckpts.glob("*/state.pt")] and not (root / "runs" / "inf" / "best").exists()


# ---------------------------------------------------------------- a process dies or hangs


def launch_and_watch(cmd: list[str], root: Path, limit_s: float, **fault: str) -> tuple[int, float, str]:
    """Start a 2-rank launch; once the faulty rank is gone (killed) or stopped (hung), time how long the
    launch takes to end. Returns (exit code, seconds from the fault to the end, output)."""
    proc = subprocess.Popen(cmd, cwd=root, env=env(**fault), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        faulty, deadline = None, time.monotonic() + 120
        while faulty is None and time.monotonic() < deadline:
            faulty = next((p for p in ranks_of(proc) if p.environ().get("RANK") == "1"), None)
            time.sleep(0.05)
        assert faulty is not None, "rank 1 never started"
        while time.monotonic() < deadline:
            try:
                if faulty.status() in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE):
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
        fault_at = time.monotonic()
        out, _ = proc.communicate(timeout=limit_s)
        return proc.returncode, time.monotonic() - fault_at, out
    finally:
        kill_tree(proc)


@pytest.mark.parametrize("fault, resumed_from", [
    ("kill-at-step:4", "warmup-0001"),             # mid-epoch: warm-up epoch 2 of 3 steps each
    ("kill-in-gather:3", "warmup-0002"),           # the first round's (after 2 validations)
    ("kill-in-save:warmup-0002", "warmup-0001"),   # rank 0 is inside the save when rank 1 dies
])
@launches
def test_a_killed_rank_ends_the_launch_and_auto_resumes(root: Path, fault_reference_2: Path, fault: str,
                                                        resumed_from: str):
    name = f"killed-{fault.split(':')[0]}"
    cmd = train_command(config(root), 2, f"run.name={name}", "data.num_workers=1", inject=True)
    code, took, out = launch_and_watch(cmd, root, 60, FER_DIST_FAULT=fault, FER_DIST_FAULT_RANK="1")
    print(f"{fault}: the launch ended {took:.1f} s after rank 1 was killed, code {code}")
    assert code != 0 and "SIGKILL" in out, out[-3000:]
    assert took < 45, out[-3000:]  # the peer sees the closed connection at once; the agent then stops
    run_dir = root / "runs" / name
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / resumed_from
    resumed = run(train_command(config(root), 2, f"run.name={name}", "data.num_workers=1"), root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / resumed_from}" in resumed.stderr
    assert_same_end(final_state(run_dir), final_state(fault_reference_2))


@launches
def test_a_hung_rank_times_out_the_others(root: Path):
    """SIGSTOP: alive, holding its sockets, never answering; only the collective timeout can tell."""
    cmd = train_command(config(root), 2, "run.name=hung", f"run.collective_timeout_s={TIMEOUT_S}",
                        inject=True)
    code, took, out = launch_and_watch(cmd, root, TIMEOUT_S + AGENT_GRACE_S + 60,
                                       FER_DIST_FAULT="stop-at-step:4", FER_DIST_FAULT_RANK="1")
    print(f"hung rank: the launch ended {took:.1f} s after rank 1 stopped, code {code}")
    assert code != 0
    assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in out, out[-3000:]
    # rank 0 gives up after the timeout; the agent then needs its grace period to kill the stopped rank
    assert TIMEOUT_S - 1 < took < TIMEOUT_S + AGENT_GRACE_S + 20, took


@launches
def test_fer_dist_launch_names_the_killed_rank(root: Path):
    """Through `python -m fer_dist.launch` (what `fer-dist train` runs): one line, the rank's signal."""
    cmd = [sys.executable, "-m", "fer_dist.launch", "--num_processes", "2", "--num_machines", "1",
           "--dynamo_backend", "no", "--mixed_precision", "no", "--multi_gpu", "--main_process_port",
           str(free_port()), INJECT, "--config", str(config(root)), "run.name=via-launch",
           "run.num_processes=2"]
    done = run(cmd, root, timeout=120, FER_DIST_FAULT="kill-at-step:4", FER_DIST_FAULT_RANK="1")
    assert done.returncode == 128 + 9, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == "error: rank 1 was killed by SIGKILL (its own output is above)", done.stderr[-3000:]
