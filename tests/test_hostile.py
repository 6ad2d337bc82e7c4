"""Hostile files: a shard carrying a pickle member, a checkpoint, an RNG file, a weights file and a model
export whose bytes are pickles that write a marker file when unpickled. Every reader is run for real (the
trainer, `fer-dist train`, `inspect`, `eval`, load_exported, load_checkpoint): each refuses the file with
one line, and the marker is never written. The trainer and the commands run in this process through their
entry points (`train.main`, the Typer app): every refusal comes before any process group would form.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from train_fixtures import Touch, check_payload, copy_workdir, payload, write_config
from typer.testing import CliRunner

from fer_dist import train
from fer_dist.checkpoint_files import load_checkpoint, rng_file
from fer_dist.cli import app
from fer_dist.errors import FerDistError
from fer_dist.models import load_exported
from fer_dist.models.weights import read_state_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory, finished_run: Path) -> Path:
    """Clean shards and a finished tiny run (best/ and checkpoints; a copy of the session's) to copy hostile
    variants from."""
    root = copy_workdir(finished_run, tmp_path_factory.mktemp("hostile") / "work")
    check_payload(root)
    return root


def marker(root: Path) -> Path:
    return root / "PWNED"


def hostile_shards(root: Path, ext: str) -> Path:
    """The clean folder with a `<key>.<ext>` pickle member after sample 5's PNG; the manifest's sha256 made
    to match, so only the member allow-list stands between the bytes and an unpickle."""
    out = root / f"shards-{ext}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(root / "shards", out)
    path = out / "train-000000.tar"
    buf = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
            if member.name == "00000005.png":
                evil = tarfile.TarInfo(f"00000005.{ext}")
                data = payload(marker(root))
                evil.size = len(data)
                dst.addfile(evil, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def hostile_checkpoint(root: Path, file: str) -> Path:
    """A copy of the run's last checkpoint with `file` (state.pt or an RNG file) replaced by a pickle."""
    src = root / "runs" / "good" / "checkpoints" / (root / "runs/good/checkpoints/latest").read_text().strip()
    out = root / "evil-run" / "checkpoints" / "step-00000001"
    shutil.rmtree(root / "evil-run", ignore_errors=True)
    shutil.copytree(src, out)
    torch.save({"model": Touch(marker(root))}, out / file)
    return out


def hostile_export(root: Path) -> Path:
    """best/ with model.safetensors replaced by a pickle, and model.json's sha256 made to match."""
    out = root / "evil-export"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(root / "runs" / "good" / "best", out)
    torch.save({"w": Touch(marker(root))}, out / "model.safetensors")
    meta = json.loads((out / "model.json").read_text())
    meta["weights"]["sha256"] = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    (out / "model.json").write_text(json.dumps(meta))
    return out


class Done(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def trainer(work: Path, capsys, monkeypatch):
    """trainer(config, *overrides): `python -m fer_dist.train` on 1 process, run in this process."""
    monkeypatch.chdir(work)

    def run(config: Path, *overrides: str) -> Done:
        capsys.readouterr()
        code = train.main(["--config", str(config), "run.num_processes=1", *overrides])
        out = capsys.readouterr()
        return Done(code, out.out, out.err)

    return run


def command(*args: str | Path) -> Done:
    """`fer-dist ARGS` through its Typer app in this process."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return Done(result.exit_code, result.stdout, result.stderr)


def one_line_exit_2(done: Done, *fragments: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, (fragment, last)


def test_the_payloads_are_real(work: Path, tmp_path: Path):
    """Unpickling the payload runs it (it pickles builtins.open, importable anywhere), as torch.load without
    weights_only=True would: what the readers below must not do."""
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps({"model": Touch(probe)}))
    assert probe.exists()


@pytest.mark.parametrize("ext", ["pyd", "pickle"])
def test_a_pickle_member_in_a_shard_is_never_unpickled(work: Path, trainer, ext: str):
    shards = hostile_shards(work, ext)
    cfg = write_config(work / f"cfg-{ext}", shards, method={"warmup_epochs": 1, "self_training": False})
    one_line_exit_2(trainer(cfg, "run.name=evil-shard"), "train-000000.tar", f"00000005.{ext}")
    launcher = command("train", "--config", cfg, "--dry-run")
    one_line_exit_2(launcher, f"00000005.{ext}")
    inspect = command("inspect", shards)
    one_line_exit_2(inspect, "train-000000.tar")
    assert f"unexpected member '00000005.{ext}'" in inspect.stdout + inspect.stderr
    evaluate = command("eval", work / "runs/good", "--shards", f"{shards}:train", "--out", work / "eval-out")
    one_line_exit_2(evaluate, f"00000005.{ext}")
    assert not marker(work).exists()
    assert not (work / "eval-out").exists() and not (cfg.parent / "runs").exists()


@pytest.mark.parametrize("file", ["state.pt", rng_file(0)])
def test_a_pickled_checkpoint_is_refused_by_every_reader(work: Path, trainer, file: str):
    ckpt = hostile_checkpoint(work, file)
    with pytest.raises(FerDistError, match="weights_only refused it"):
        load_checkpoint(ckpt, 0)
    resume = trainer(work / "config.yaml", "run.name=resumed-evil", f"run.resume={ckpt}")
    one_line_exit_2(resume, str(ckpt / file))
    if file == "state.pt":
        evaluate = command("eval", ckpt, "--shards", work / "shards", "--out", work / "eval-ckpt")
        one_line_exit_2(evaluate, "weights_only refused it")
    assert not marker(work).exists()
    assert not (work / "runs" / "resumed-evil").exists()


def test_a_pickled_export_and_weights_file_are_refused(work: Path, trainer):
    export = hostile_export(work)
    with pytest.raises(FerDistError, match="model.safetensors"):
        load_exported(export)
    evaluate = command("eval", export, "--shards", work / "shards", "--out", work / "eval-export")
    one_line_exit_2(evaluate, "model.safetensors")
    weights = work / "evil-weights.pt"
    torch.save({"w": Touch(marker(work))}, weights)
    with pytest.raises(FerDistError, match="not a readable weights file"):
        read_state_file(weights)
    done = trainer(work / "config.yaml", "run.name=evil-weights", "model.pretrained=true",
                   f"model.weights={weights}")
    assert done.returncode == 2 and "evil-weights.pt" in done.stderr, done.stderr[-3000:]
    assert not marker(work).exists()
