"""What the fault tests share: a tiny shard folder, a tiny config, the trainer's commands, hostile payloads.

Runs are as small as a real run gets: small_cnn, 2 warm-up epochs of 3 steps, one round, a few seconds of
compute each; most of a run's time is its imports.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import yaml

from fer_dist.data.pack import pack
from fer_dist.data.sources.base import SourceOptions

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
FER_DIST = str(VENV_BIN / "fer-dist")


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


def make_shards(out: Path) -> Path:
    """A synthetic shard folder of 6 subjects x 6 sequences x 3 frames at 32 px (train, val, test)."""
    pack("synthetic", [], out, options=SourceOptions(subjects=6, frames=3, image_size=32), size=32,
         samples_per_shard=8, workers=1, progress=False)
    return out


def write_config(root: Path, shards: Path, **sections: dict) -> Path:
    """A config over `shards` with runs under root/runs; `sections` update its sections."""
    ref = lambda split: [{"dir": str(shards), "splits": [split]}]  # noqa: E731
    config = {
        "data": {"labelled": ref("train"), "unlabelled": ref("train"), "val": ref("val"), "test": ref("test"),
                 "num_workers": 0},
        "model": {"backbone": "small_cnn", "pretrained": False, "trainable": "all", "input_size": 32},
        "method": {"warmup_epochs": 2, "warmup_patience": 5, "max_rounds": 1, "tau": 0.3},
        "optim": {"lr": 0.002, "batch_size": 16},
        "run": {"dir": str(root / "runs"), "keep_last": 20, "progress": False},
    }
    for name, values in sections.items():
        config[name].update(values)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


INJECT = str(REPO / "tests" / "fault_inject.py")


def train_command(config: Path, processes: int, *overrides: str, inject: bool = False) -> list[str]:
    """The trainer on 1 process (python -m) or 2 gloo ranks (accelerate launch); with `inject`, through
    tests/fault_inject.py (the fault named by FER_DIST_FAULT in the environment)."""
    args = ["--config", str(config), f"run.num_processes={processes}", *overrides]
    target = [INJECT] if inject else ["-m", "fer_dist.train"]
    if processes == 1:
        return [sys.executable, *target, *args]
    return [str(VENV_BIN / "accelerate"), "launch", "--config_file",
            str(REPO / "launch_configs/accelerate/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
            *target, *args]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def run(cmd: list[str], cwd: Path, timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env(**extra_env))


def finished_tiny_run(root: Path) -> Path:
    """`root`/shards, `root`/config.yaml (one warm-up epoch, no rounds) and its finished run `good`."""
    write_config(root, make_shards(root / "shards"), method={"warmup_epochs": 1, "self_training": False})
    done = run(train_command(root / "config.yaml", 1, "run.name=good"), root)
    assert done.returncode == 0, done.stderr[-3000:]
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
