"""The one fixture family of the trainer, launch, fault, SLURM and evaluation tests (`from train_fixtures
import ...`): synthetic shard folders, configs over them, the trainer's commands, process helpers, hostile
payloads. tests/conftest.py builds the shared ones (shards, reference runs) once per session.

Two shard sizes: `train_shards` (12 subjects x 6 sequences x 5 frames at 48 px; 2 warm-up epochs and
3 rounds in `tiny_training`'s config) and `make_shards` (6 x 6 x 3 at 32 px, 3 steps an epoch; the fault
tests' kill points are counted in its steps). Most of a run's time is its imports.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import yaml
from filelock import FileLock, Timeout

from fer_dist.data.pack import pack
from fer_dist.data.sources.base import SourceOptions

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
FER_DIST = str(VENV_BIN / "fer-dist")
INJECT = str(REPO / "tests" / "fault_inject.py")
CPU_2PROC = str(REPO / "launch_configs/accelerate/cpu_2proc.yaml")

# ---------------------------------------------------------------- ports

_PORTS: set[int] = set()


def free_port() -> int:
    """A free localhost port, never the same twice in one process (launches of a test may overlap)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS:
            _PORTS.add(port)
            return port


# ---------------------------------------------------------------- built once per session


def shared_root(tmp_path_factory) -> Path:
    """A folder every xdist worker of this test session sees: the parent of the workers' base temps."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


_LOCKS: dict[Path, FileLock] = {}


def _lock(path: Path) -> FileLock:
    """One FileLock object per file in this process: it is reentrant, two objects on one file are not."""
    return _LOCKS.setdefault(path, FileLock(str(path)))


def shared_folder(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """`build(folder)` once per test session, whichever xdist worker asks first; the folder.

    Each xdist worker is a session of its own: the folder lies where all of them see it, built under a file
    lock; the others wait for it and reuse it.
    """
    root = shared_root(tmp_path_factory)
    out, done = root / name, root / f"{name}.done"
    with _lock(root / f"{name}.lock"):
        if not done.exists():  # a failed build left no mark: the next one asking tries again
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            done.touch()
    return out


LAUNCH_SLOTS = 2
_HELD: list[FileLock] = []  # the launch slots this process holds


@contextlib.contextmanager
def launch_lock(tmp_path_factory, *, alone: bool = False) -> Iterator[None]:
    """Held while a multi-process training runs, whichever xdist worker starts it. A launch takes one of
    LAUNCH_SLOTS slots; `alone` takes them all, for a test whose timing asserts assume no other launch.
    conftest.py takes it around every test marked xdist_group("launch") (`launch_alone`: all slots).

    Two slots, not one: a launch keeps less than one of the 2 cores busy on average (start-up chains, polls,
    waits for a timeout or for Slurm), and with one slot the launches were the suite's critical path, the
    other worker waiting for the lock for much of the run.
    """
    root = shared_root(tmp_path_factory)
    slots = [_lock(root / f"launch-{i}.lock") for i in range(LAUNCH_SLOTS)]
    taken: list[FileLock] = []
    try:
        if alone:  # in order: two tests asking for all slots cannot each hold a part
            for slot in slots:
                slot.acquire()
                taken.append(slot)
        elif _HELD:  # a fixture of a test that holds a slot: the same slot again (FileLock is reentrant)
            _HELD[0].acquire()
            taken.append(_HELD[0])
        else:
            free = next((slot for slot in slots if _try(slot)), None)
            if free is None:
                slots[0].acquire()
                free = slots[0]
            taken.append(free)
        _HELD.extend(taken)
        yield
    finally:
        for slot in reversed(taken):
            _HELD.remove(slot)
            slot.release()


def _try(lock: FileLock) -> bool:
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    return True


# ---------------------------------------------------------------- shards and configs


def train_shards(out: Path) -> Path:
    """A synthetic shard folder of 12 subjects x 6 sequences x 5 frames at 48 px (train, val, test)."""
    pack("synthetic", [], out, options=SourceOptions(subjects=12, frames=5), workers=1, progress=False)
    return out


def make_shards(out: Path) -> Path:
    """A synthetic shard folder of 6 subjects x 6 sequences x 3 frames at 32 px (train, val, test)."""
    pack("synthetic", [], out, options=SourceOptions(subjects=6, frames=3, image_size=32), size=32,
         samples_per_shard=8, workers=1, progress=False)
    return out


def _config_file(root: Path, config: dict[str, dict[str, Any]], sections: dict[str, dict[str, Any]]) -> Path:
    for name, values in sections.items():
        config[name].update(values)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _refs(shards: Path) -> dict[str, list[dict[str, Any]]]:
    ref = lambda split: [{"dir": str(shards), "splits": [split]}]  # noqa: E731
    return {"labelled": ref("train"), "unlabelled": ref("train"), "val": ref("val"), "test": ref("test")}


# conftest's train_reference: the 2-process run that tests/test_train.py and tests/test_slurm.py compare with
REFERENCE_SECTIONS: dict[str, dict[str, Any]] = {"run": {"debug": True, "keep_last": 20}}


def tiny_training(root: Path, shards: Path | None = None, **sections: dict[str, Any]) -> Path:
    """`root`/config.yaml over `shards` (default: new `train_shards` in `root`/shards), runs under
    `root`/runs: small_cnn, 2 warm-up epochs, 3 rounds, no loader workers (a worker's fork server costs
    each rank 2.6 CPU-s; the tests of workers ask for them); `sections` update the config's sections
    (`run={"debug": True}`). Returns `root`."""
    shards = shards or train_shards(root / "shards")
    config: dict[str, dict[str, Any]] = {
        "data": {**_refs(shards), "num_workers": 0},
        "model": {"backbone": "small_cnn", "pretrained": False, "trainable": "all"},
        "method": {"warmup_epochs": 2, "warmup_patience": 5, "max_rounds": 3, "tau": 0.3},
        "optim": {"lr": 0.002, "batch_size": 16},
        "run": {"dir": str(root / "runs"), "progress": False},
    }
    _config_file(root, config, sections)
    return root


def write_config(root: Path, shards: Path, **sections: dict[str, Any]) -> Path:
    """A config over `make_shards`' folder with runs under root/runs (32 px, 2 warm-up epochs, 1 round);
    `sections` update its sections. Returns the config's path."""
    config: dict[str, dict[str, Any]] = {
        "data": {**_refs(shards), "num_workers": 0},
        "model": {"backbone": "small_cnn", "pretrained": False, "trainable": "all", "input_size": 32},
        "method": {"warmup_epochs": 2, "warmup_patience": 5, "max_rounds": 1, "tau": 0.3},
        "optim": {"lr": 0.002, "batch_size": 16},
        "run": {"dir": str(root / "runs"), "keep_last": 20, "progress": False},
    }
    return _config_file(root, config, sections)


def copy_workdir(src: Path, dst: Path) -> Path:
    """A private copy of a shared work folder, for a test that writes into it: its config's paths under
    `src` (shards, run.dir) now name the copy's. Returns `dst`."""
    shutil.copytree(src, dst)
    for config in dst.glob("*.yaml"):
        config.write_text(config.read_text().replace(str(src), str(dst)))
    return dst


# ---------------------------------------------------------------- running the trainer


def train_command(config: Path, processes: int, *overrides: str, inject: bool = False) -> list[str]:
    """The trainer on 1 process (python -m) or 2 gloo ranks (accelerate launch); with `inject`, through
    tests/fault_inject.py (the fault named by FER_DIST_FAULT in the environment)."""
    args = ["--config", str(config), f"run.num_processes={processes}", *overrides]
    target = [INJECT] if inject else ["-m", "fer_dist.train"]
    if processes == 1:
        return [sys.executable, *target, *args]
    return [str(VENV_BIN / "accelerate"), "launch", "--config_file", CPU_2PROC, "--main_process_port",
            str(free_port()), *target, *args]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def run(cmd: list[str], cwd: Path, timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env(**extra_env))


def trained(cmd: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """`run`, asserting it succeeded."""
    done = run(cmd, cwd, timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def finished_tiny_run(root: Path, shards: Path | None = None) -> Path:
    """`root`/shards (a copy of `shards`, or new), `root`/config.yaml (one warm-up epoch, no rounds) and its
    finished 1-process run `good`. Returns `root`."""
    if shards is None:
        make_shards(root / "shards")
    else:
        shutil.copytree(shards, root / "shards")
    write_config(root, root / "shards", method={"warmup_epochs": 1, "self_training": False})
    trained(train_command(root / "config.yaml", 1, "run.name=good"), root)
    return root


def ranks_of(proc: subprocess.Popen) -> list[psutil.Process]:
    """The trainer processes under a launcher (python running fer_dist.train or tests/fault_inject.py)."""
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            line = child.cmdline()
            if any(m in " ".join(line) for m in ("fer_dist.train", "fault_inject.py")) and \
                    "accelerate" not in line[1]:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and everything under it (test clean-up)."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


# ---------------------------------------------------------------- hostile payloads


class Touch:
    """Unpickling this object creates the marker file: a payload that would run on any unpickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload(marker: Path) -> bytes:
    """Pickle bytes that create `marker` when unpickled (check_payload proves they do)."""
    return pickle.dumps(Touch(marker))


def check_payload(tmp: Path) -> None:
    """The payload is real: a plain unpickle writes its marker."""
    probe = tmp / "probe-marker"
    pickle.loads(payload(probe))
    assert probe.exists()
    probe.unlink()
