"""Elastic resume: a checkpoint written on 2 gloo processes continues on 1, and one written on 1 on 2.

A run SIGKILLed mid-epoch (tests/fault_inject.py picks the step; run.checkpoint_every_steps left a
mid-epoch checkpoint just before it) resumes on another number of processes and must end as the
uninterrupted run: the same rounds, steps, selections and validation accuracies; the target table, the
epochs' mean losses and the weights equal within TOLERANCE. The model is kept free of what legitimately
changes with the split of a global batch over processes (per-process batch-norm statistics, per-process
dropout masks): a "pretrained" trunk (a weights file of a seeded small_cnn) frozen, its batch norms in
eval mode, and no dropout. What remains is floating-point reduction order (DDP's all-reduce of the
gradients against one process's sum).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from train_fixtures import launch_lock, run, train_command, write_config

from fer_dist.checkpoint_files import latest_checkpoint, load_checkpoint
from fer_dist.models.backbones import BACKBONES

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("launch")]  # 2-rank runs: a launch slot each
TOLERANCE = 1e-4  # absolute, on weights, table entries and mean losses (of order 0.1 to 1)
UNCOMPARED = ("time/", "gather/")  # wall-clock timings; bytes gathered, which grow with the processes


@pytest.fixture(scope="module")
def root(tmp_path_factory, small_shards: Path) -> Path:
    root = tmp_path_factory.mktemp("elastic")
    torch.manual_seed(0)
    trunk, _ = BACKBONES["small_cnn"].make(None)
    torch.save(trunk.state_dict(), root / "trunk.pt")
    model = {"pretrained": True, "weights": str(root / "trunk.pt"), "trainable": "head", "dropout": 0.0}
    write_config(root, small_shards, model=model,
                 method={"max_rounds": 2}, optim={"lr": 0.03},  # a frozen trunk: the head learns fast
                 run={"checkpoint_every_steps": 2, "debug": True})
    return root


def final_state(run_dir: Path) -> dict:
    return load_checkpoint(latest_checkpoint(run_dir), None)[0]


@pytest.fixture(scope="module")
def reference(root: Path, tmp_path_factory) -> dict[int, dict]:
    """The uninterrupted run on 1 and on 2 processes."""
    out = {}
    for processes in (1, 2):
        with launch_lock(tmp_path_factory):  # a module fixture: set up before the tests' own lock
            done = run(train_command(root / "config.yaml", processes, f"run.name=ref{processes}"), root)
        assert done.returncode == 0, done.stderr[-3000:]
        out[processes] = final_state(root / "runs" / f"ref{processes}")
    return out


def assert_close_history(a: list[dict], b: list[dict]) -> None:
    assert [(h["kind"], h["index"]) for h in a] == [(h["kind"], h["index"]) for h in b]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            u, v = x[key], y[key]
            if key.startswith(UNCOMPARED):
                continue
            if key == "selection":  # the same ids confident, removed and drawn
                assert all(torch.equal(u[k], v[k]) for k in ("confident", "removed", "added")), x["index"]
            elif isinstance(u, float):  # nan: a mean over no confident sample, on both sides alike
                assert math.isclose(u, v, abs_tol=TOLERANCE) or math.isnan(u) and math.isnan(v), (key, u, v)
            elif isinstance(u, list) and u and isinstance(u[0], float):
                assert all(math.isclose(p, q, abs_tol=TOLERANCE) for p, q in zip(u, v, strict=True)), key
            else:
                assert u == v, (key, u, v)


def assert_same_end(a: dict, b: dict) -> None:
    """Same rounds, steps, history and selections; table and weights within TOLERANCE."""
    sa, sb = a["state"], b["state"]
    progress = ("phase", "round", "epoch", "step")
    assert [sa[k] for k in progress] == [sb[k] for k in progress]
    assert_close_history(sa["history"], sb["history"])
    assert any(h.get("selection", {}).get("added", torch.zeros(0)).numel() for h in sa["history"]), \
        "no round drew an unlabelled sample: the selections show nothing"
    torch.testing.assert_close(sa["targets"], sb["targets"], rtol=0, atol=TOLERANCE)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(tensor.float(), b["model"][name].float(), rtol=0, atol=TOLERANCE)


def test_the_uninterrupted_run_ends_alike_on_1_and_2_processes(reference: dict[int, dict]):
    assert reference[1]["world_size"] == 1 and reference[2]["world_size"] == 2
    assert_same_end(reference[1], reference[2])


@pytest.mark.parametrize("saved_on, resumed_on, kill_at, saved_at, workers", [
    (2, 1, 5, "step-00000004", 0),  # warm-up epoch 2, after its first step (3 steps per epoch)
    (2, 1, 9, "step-00000008", 0),  # round 1, after its second step
    (1, 2, 9, "step-00000008", 1),  # the reverse, and one loader worker per process after the resume
])
def test_a_mid_epoch_checkpoint_resumes_on_another_number_of_processes(
        root: Path, reference: dict[int, dict], saved_on: int, resumed_on: int, kill_at: int, saved_at: str,
        workers: int):
    name = f"elastic-{saved_on}-{resumed_on}-{kill_at}"
    config = root / "config.yaml"
    killed = run(train_command(config, saved_on, f"run.name={name}", inject=True), root,
                 FER_DIST_FAULT=f"kill-at-step:{kill_at}", FER_DIST_FAULT_RANK="0")
    assert killed.returncode != 0, killed.stderr[-3000:]
    run_dir = root / "runs" / name
    latest = latest_checkpoint(run_dir)
    assert latest == run_dir / "checkpoints" / saved_at
    saved = load_checkpoint(latest, None)[0]
    assert saved["world_size"] == saved_on and saved["state"]["step_in_epoch"] > 0, "not mid-epoch"
    resumed = run(train_command(config, resumed_on, f"run.name={name}", f"data.num_workers={workers}"), root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"was saved on {saved_on} processes, resumed on {resumed_on}" in resumed.stderr
    end = final_state(run_dir)
    assert end["world_size"] == resumed_on
    assert_same_end(end, reference[2])
    # the tolerance is tight against what training after the resume moved the weights by
    moved = max(float((end["model"][k].float() - v.float()).abs().max()) for k, v in saved["model"].items())
    assert moved > 100 * TOLERANCE, moved
