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


def _hashed(kind: str, ident: str) -> str:
    return hashlib.sha256(f"fer-dist/{kind}/{ident}".encode()).hexdigest()[:8]


def host_id() -> str:
    """A short stable id of this host: a hash of /etc/machine-id (the host name where there is none), so
    two machines of the same CPU model tell apart without publishing the id itself."""
    try:
        ident = Path("/etc/machine-id").read_text().strip()
    except OSError:
        ident = ""
    return _hashed("host", ident or platform.node())


def boot_id() -> str | None:
    """A short id of this boot (Linux's random boot id, hashed), or None. Virtual machines cloned from one
    image share their machine id (two different CPUs' records here carried one host id): the boot id tells
    such machines, and one machine's sessions, apart."""
    try:
        return _hashed("boot", Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        return None


def cpu_model(cpuinfo: str) -> str | None:
    """The CPU's model name from /proc/cpuinfo's text, with its x86 family and model numbers where the name
    alone is generic ("AMD EPYC" names several generations, whose kernels round differently)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if name and "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine() -> str:
    """CPU model and count, GPU if any, torch version, host and boot ids: two machines' figures tell apart."""
    import torch

    try:
        cpu = cpu_model(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = None
    cpu = cpu or platform.processor() or platform.machine()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    boot = boot_id()
    return (f"{os.cpu_count()} x {cpu}{gpu}, torch {torch.__version__}, host {host_id()}"
            + (f", boot {boot}" if boot else ""))
