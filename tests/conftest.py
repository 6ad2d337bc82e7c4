"""Session-wide fixtures: synthetic shard folders and reference runs, built once per test session.

Under pytest-xdist every worker has its own session, so a shared thing is built in a folder all workers
see under a file lock (`train_fixtures.shared_folder`): the first worker builds it, the others wait and
reuse it. Shared folders are read-only to tests; a test that writes into one copies it first
(`train_fixtures.copy_workdir`) or writes its runs into a folder of its own.

Tests that start multi-process trainings are marked `xdist_group("launch")`; each holds one of two launch
slots (`train_fixtures.launch_lock`), and one marked `launch_alone` as well (timing asserts) holds both, so
no other launch shares the cores with it. The slots, not xdist's `--dist loadgroup`, order them: with
pytest 9.2, xdist 3.8 ignores the groups (pytest-xdist#1386). pyproject's `--dist loadfile` keeps a file's
tests on one worker, so a module-scoped fixture is built once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from train_fixtures import (
    REFERENCE_SECTIONS,
    finished_tiny_run,
    launch_lock,
    make_shards,
    shared_folder,
    tiny_training,
    train_command,
    train_shards,
    trained,
    write_config,
)

# One thread per process, in the test processes and every training they start: xdist runs a worker per core,
# and on busy cores OpenMP's extra threads spin (a 1-process tiny run took 42 CPU-s on 2 threads, 8.5 on 1).
os.environ["FER_DIST_CPU_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def _launches(item: pytest.Item) -> bool:
    return any(m.args[:1] == ("launch",) or m.kwargs.get("name") == "launch"
               for m in item.iter_markers("xdist_group"))


LAUNCH_TIMEOUT_S = 1200  # pyproject's 300 s, and the wait for a launch slot while other launches run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _launches(item) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(LAUNCH_TIMEOUT_S))


@pytest.fixture(autouse=True)
def _launch_slot(request, tmp_path_factory) -> Iterator[None]:
    """A launch slot around a launch test (autouse: set up before its other function fixtures; a session
    or module fixture that starts 2 ranks takes a slot itself)."""
    if not _launches(request.node):
        yield
        return
    with launch_lock(tmp_path_factory, alone=request.node.get_closest_marker("launch_alone") is not None):
        yield


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """`train_fixtures.train_shards`: 12 subjects x 6 sequences x 5 frames at 48 px."""
    return shared_folder(tmp_path_factory, "synthetic-shards", lambda out: train_shards(out / "s")) / "s"


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """`train_fixtures.make_shards`: 6 subjects x 6 sequences x 3 frames at 32 px."""
    return shared_folder(tmp_path_factory, "small-shards", lambda out: make_shards(out / "s")) / "s"


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, small_shards: Path) -> Path:
    """A folder with shards/, config.yaml (1 warm-up epoch, no rounds) and its finished 1-process run
    runs/good. Read-only: copy it (`copy_workdir`) to add files."""
    return shared_folder(tmp_path_factory, "finished-run", lambda out: finished_tiny_run(out, small_shards))


@pytest.fixture(scope="session")
def train_reference(tmp_path_factory, synthetic_shards: Path) -> Path:
    """The uninterrupted 2-process run of `tiny_training`'s config over `synthetic_shards` (2 warm-up
    epochs, 3 rounds, run.debug, keep_last 20): the run folder. Tests that resume or compare against it
    write their own runs elsewhere, from a config of the same sections (REFERENCE_SECTIONS)."""

    def build(out: Path) -> None:
        tiny_training(out, synthetic_shards, **REFERENCE_SECTIONS)
        with launch_lock(tmp_path_factory):
            trained(train_command(out / "config.yaml", 2, "run.name=reference"), out)

    return shared_folder(tmp_path_factory, "train-reference", build) / "runs" / "reference"


def _fault_reference(tmp_path_factory, small_shards: Path, processes: int) -> Path:
    def build(out: Path) -> None:
        write_config(out, small_shards)
        with launch_lock(tmp_path_factory) if processes > 1 else contextlib.nullcontext():
            trained(train_command(out / "config.yaml", processes, f"run.name=ref{processes}"), out)

    return shared_folder(tmp_path_factory, f"fault-reference-{processes}", build) / "runs" / f"ref{processes}"


@pytest.fixture(scope="session")
def fault_reference_1(tmp_path_factory, small_shards: Path) -> Path:
    """The uninterrupted 1-process run of `write_config`'s config over `small_shards` (2 warm-up epochs, 1
    round): the run folder. What a resumed 1-process run of tests/test_faults.py must end as."""
    return _fault_reference(tmp_path_factory, small_shards, 1)


@pytest.fixture(scope="session")
def fault_reference_2(tmp_path_factory, small_shards: Path) -> Path:
    """The same on 2 processes (a fixture apart: a 1-process test need not wait for a 2-process run)."""
    return _fault_reference(tmp_path_factory, small_shards, 2)
