"""A full disk, for real: a small tmpfs mounted for the test (root only; skipped elsewhere, saying why),
filled while sharding, checkpointing and exporting. Each ends in one line naming what could not be written,
leaves no partial output, and the previous shards, checkpoint or export are intact.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from train_fixtures import FER_DIST, run, train_command, write_config

from fer_dist.checkpoint_files import LATEST, TMP, latest_checkpoint
from fer_dist.errors import FerDistError
from fer_dist.models import ModelSpec, build_model, export_model

pytestmark = pytest.mark.slow
SMALL = ["--dataset", "synthetic", "--size", "32", "--frames", "2", "--workers", "1", "--no-progress"]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator:
    """mount(size) -> a fresh tmpfs of that size; every one is unmounted at teardown."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        point = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (root needed): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(directory: Path) -> Path:
    """Write zeros until the filesystem is full; returns the filler file."""
    path = directory / "filler"
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError:
            pass
    return path


def digests(folder: Path) -> dict[str, str]:
    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def one_line_exit_2(done: subprocess.CompletedProcess, *fragments: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in done.stderr, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


def test_sharding_onto_a_full_disk(mount, tmp_path: Path):
    fs = mount("512k")
    first = run([FER_DIST, "shard", *SMALL, "--subjects", "2", "--out", str(fs / "shards")], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = digests(fs / "shards")
    bigger = run([FER_DIST, "shard", *SMALL, "--subjects", "40", "--overwrite", "--out", str(fs / "shards")],
                 tmp_path)
    one_line_exit_2(bigger, f"{fs / 'shards'}: cannot write the shards", "No space left on device")
    assert digests(fs / "shards") == before  # the earlier folder, byte for byte
    assert sorted(p.name for p in fs.iterdir()) == ["shards"]  # no temporary folder left


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.xdist_group("launch"))])
def test_checkpointing_onto_a_full_disk_keeps_the_previous_and_resumes(mount, tmp_path: Path,
                                                                    small_shards: Path, processes: int):
    fs = mount("64m")
    cfg = write_config(tmp_path, small_shards, run={"dir": str(fs / "runs")})
    done = run(train_command(cfg, processes, "run.name=full", inject=True), tmp_path, timeout=120,
               FER_DIST_FAULT="fill-before-save:warmup-0002")
    message = "checkpoint: cannot write it: No space left on device"
    if processes == 1:
        one_line_exit_2(done, message, "previous checkpoint is intact")
    else:  # both ranks end (no barrier left waiting); a bare accelerate launch exits 1
        assert done.returncode == 1 and f"error: {message}" in done.stderr, done.stderr[-3000:]
    ckpts = fs / "runs" / "full" / "checkpoints"
    assert (ckpts / LATEST).read_text().strip() == "warmup-0001"
    assert latest_checkpoint(ckpts.parent) == ckpts / "warmup-0001"
    assert not list(ckpts.glob(f"{TMP}*")) and not (ckpts / "warmup-0002").exists()  # nothing partial
    (fs / "runs" / "filler").unlink()  # space again
    resumed = run(train_command(cfg, processes, "run.name=full"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpts / 'warmup-0001'}" in resumed.stderr


@pytest.mark.xdist_group("launch")  # 2 ranks: one launch at a time on the machine (conftest.py)
def test_a_full_disk_at_the_best_export_ends_every_rank(mount, tmp_path: Path, small_shards: Path):
    fs = mount("64m")
    cfg = write_config(tmp_path, small_shards, run={"dir": str(fs / "runs")})
    status = tmp_path / "status"  # each rank's one-line error lands here (fer_dist.launch's mechanism)
    status.mkdir()
    done = run(train_command(cfg, 2, "run.name=full", inject=True), tmp_path, timeout=120,
               FER_DIST_FAULT="fill-before-export", FER_DIST_STATUS_DIR=str(status))
    assert done.returncode == 1, done.stderr[-3000:]
    reports = {p.name: json.loads(p.read_text())["message"] for p in status.iterdir()}
    assert "best: cannot write the export (the previous one is intact): No space left on device" \
        in reports["rank-0.json"]
    # rank 1 was told and raised too, rather than wait at a barrier for the collective timeout
    assert reports["rank-1.json"] == "the main process failed to write (see its error)"
    run_dir = fs / "runs" / "full"
    assert not (run_dir / "best").exists() and not list(run_dir.glob(".tmp-*"))


def test_exporting_onto_a_full_disk_keeps_the_previous_export(mount):
    fs = mount("16m")
    spec = ModelSpec(num_classes=7, backbone="small_cnn", pretrained=False, trainable="all")
    net = build_model(spec)
    export_model(net, fs / "best")
    before = digests(fs / "best")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    filler = fill(fs)
    with pytest.raises(FerDistError, match=r"best: cannot write the export \(the previous one is intact\): "
                                           "No space left on device"):
        export_model(net, fs / "best")
    assert digests(fs / "best") == before
    assert sorted(p.name for p in fs.iterdir()) == ["best", "filler"]  # no temporary folder left
    filler.unlink()
    export_model(net, fs / "best")  # and with space again the new one goes in
    assert digests(fs / "best") != before
