"""docs/results/<experiment>.json: one record per finished arm and seed, written atomically after each.

A record: {"arm", "seed", "test_set", "test_accuracy", "macro_f1", "val_accuracy", "rounds",
"confident_per_round", "drawn_per_round", "wall_s", "commit", "machine", "date"} and, where measured,
"thresholds_per_round", "other_tests", "intensity". Accuracies are fractions (0-1).

Appends hold a file lock (`.<name>.lock` beside the records, filelock's), so array tasks of one experiment
that finish together on a shared file system each add their record and lose none.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from filelock import FileLock

from fer_dist.errors import FerDistError
from fer_dist.files import write_text_atomic

REQUIRED = ("arm", "seed", "test_accuracy", "macro_f1", "val_accuracy", "rounds", "confident_per_round",
            "drawn_per_round", "wall_s", "commit", "machine")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of one experiment; [] where the file does not exist yet."""
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FerDistError(f"{path}: not valid JSON (line {e.lineno})") from None
    if not isinstance(records, list):
        raise FerDistError(f"{path}: expected a list of records")
    for i, rec in enumerate(records):
        missing = [k for k in REQUIRED if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise FerDistError(f"{path}: record {i}: missing {missing[0]!r}")
    return records


def recorded(records: list[dict[str, Any]]) -> set[tuple[str, int]]:
    """(arm, seed) of every record: what the runner skips."""
    return {(r["arm"], int(r["seed"])) for r in records}


def lock_path(path: Path) -> Path:
    """The lock file of a records file (hidden, beside it: the lock must live where every task sees it)."""
    return path.parent / f".{path.name}.lock"


def add_record(path: Path, record: dict[str, Any]) -> None:
    """Append one record: under the lock, the file is read again, then replaced in one step."""
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"record lacks {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_path(path)):
        records = read_records(path)
        if (record["arm"], int(record["seed"])) in recorded(records):
            raise FerDistError(f"{path}: arm {record['arm']} seed {record['seed']} is already recorded")
        write_text_atomic(path, json.dumps(records + [record], indent=1) + "\n")


def commit() -> str:
    """The checkout's commit, `-dirty` where tracked files differ from it; `unknown` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def host_id() -> str:
    """A short stable id of this host: a hash of /etc/machine-id (the host name where there is none), so
    two machines of the same CPU model tell apart without publishing the id itself."""
    try:
        ident = Path("/etc/machine-id").read_text().strip()
    except OSError:
        ident = ""
    ident = ident or platform.node()
    return hashlib.sha256(f"fer-dist/host/{ident}".encode()).hexdigest()[:8]


def machine() -> str:
    """CPU model and count, GPU if any, torch version and the host id: two machines' figures tell apart."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} x {cpu}{gpu}, torch {torch.__version__}, host {host_id()}"
