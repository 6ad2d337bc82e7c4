"""The bad-input matrix: every mistake a user makes, one row each, and what each must give: one line
naming what is wrong, exit code 2, nothing written anywhere under the working folder.

Rows already tabled elsewhere are not repeated here: `fer-dist shard`'s sources and options
(tests/test_cli_shard.py, BAD_CASES), the evaluation commands' arguments (tests/test_evaluate_cli.py, BAD),
three `fer-dist train` overrides (tests/test_launch.py). The rows below are the rest: configs, overrides,
shard folders and their manifests, splits a folder lacks, model and weights files, checkpoints, and
the trainer run directly (`python -m fer_dist.train`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from train_fixtures import copy_workdir
from typer.testing import CliRunner

from fer_dist import train
from fer_dist.cli import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory, finished_run: Path) -> Path:
    """Shards, a finished tiny run (a copy of the session's), and the broken files the rows name."""
    w = copy_workdir(finished_run, tmp_path_factory.mktemp("bad") / "work")
    (w / "notyaml.yaml").write_text("data: [unclosed\n")
    (w / "list.yaml").write_text("- a\n- b\n")
    (w / "unknown.yaml").write_text((w / "config.yaml").read_text() + "colour: blue\n")
    (w / "empty-dir").mkdir()
    for name, damage in {"badjson": lambda d: (d / "manifest.json").write_text("{not json"),
                         "lostshard": lambda d: (d / "train-000000.tar").unlink()}.items():
        shutil.copytree(w / "shards", w / name)
        damage(w / name)
    shutil.copytree(w / "runs/good/best", w / "cutmodel")
    weights = w / "cutmodel/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    shutil.copytree(w / "runs/good/best", w / "badmeta")
    (w / "badmeta/model.json").write_text("{")
    (w / "weights.bin").write_bytes(b"\x00" * 64)
    return w


def ref(split_dir: str, split: str = "val") -> str:
    return f"[{{dir: {split_dir}, splits: [{split}]}}]"


TRAIN = ["train", "--config", "{w}/config.yaml", "--processes", "1", "--dry-run"]

# case: (command line, the fragment its one line must hold)
CLI_MATRIX = {
    # configs and overrides
    "config missing": (["train", "--config", "{w}/nosuch.yaml"], "nosuch.yaml: config file not found"),
    "config not YAML": (["train", "--config", "{w}/notyaml.yaml"], "notyaml.yaml: line"),
    "config a list": (["train", "--config", "{w}/list.yaml"], "expected a mapping of config sections"),
    "config unknown key": (["train", "--config", "{w}/unknown.yaml"], "colour: unknown key"),
    "override no =": ([*TRAIN, "tau"], "config override 'tau': expected key=value"),
    "override bad type": ([*TRAIN, "optim.batch_size=abc"], "optim.batch_size"),
    "override bad YAML": ([*TRAIN, "data.val=[{"], "config override data.val: not a YAML value"),
    "override on_error": ([*TRAIN, "data.on_error=maybe"], "data.on_error"),
    "run name a path": ([*TRAIN, "run.name=a/b"], "must be a plain folder name"),
    # shard folders, manifests, splits
    "quick start, mistyped folder": (["train", "--dry-run", "data.labelled=" + ref("shards/nosuch", "train")],
                                     "shards/nosuch: no such shard folder"),
    "shard folder missing": ([*TRAIN, f"data.val={ref('{w}/nosuch')}"], "nosuch: no such shard folder"),
    "not a shard folder": ([*TRAIN, f"data.val={ref('{w}/empty-dir')}"], "manifest.json: no manifest"),
    "split missing": ([*TRAIN, f"data.val={ref('{w}/shards', 'nosplit')}"], "no split 'nosplit'"),
    "manifest not JSON": ([*TRAIN, f"data.val={ref('{w}/badjson')}"],
                          "badjson/manifest.json: not valid JSON"),
    "shard file missing": ([*TRAIN, f"data.labelled={ref('{w}/lostshard', 'train')}"],
                           "train-000000.tar: shard listed in the manifest is missing"),
    "labelled is test": ([*TRAIN, f"data.labelled={ref('{w}/shards', 'test')}"],
                         "labelled training samples are also val/test samples"),
    # model, weights and checkpoint files
    "weights missing": ([*TRAIN, "model.pretrained=true", "model.weights={w}/nosuch.pt"],
                        "model.weights: {w}/nosuch.pt does not exist"),
    "resume missing": ([*TRAIN, "run.resume={w}/nosuch"], "run.resume: {w}/nosuch does not exist"),
    "eval truncated model": (["eval", "{w}/cutmodel", "--shards", "{w}/shards"], "model.safetensors"),
    "eval model.json broken": (["eval", "{w}/badmeta", "--shards", "{w}/shards"], "badmeta/model.json"),
    "eval damaged shards": (["eval", "{w}/runs/good", "--shards", "{w}/lostshard:train"],
                            "shard listed in the manifest is missing"),
    "inspect missing folder": (["inspect", "{w}/nosuch"], "nosuch: no such shard folder"),
    "inspect not a shard folder": (["inspect", "{w}/empty-dir"], "no manifest"),
}

# the trainer's entry point, as `accelerate launch -m fer_dist.train` runs it on every rank; each error is
# raised before any process group forms, so `train.main` runs in this process (no launch, no imports)
MODULE_MATRIX = {
    "mistyped folder, no --config": (["data.labelled=" + ref("shards/nosuch", "train")],
                                     "shards/nosuch: no such shard folder"),
    "unknown backbone": (["--config", "{w}/config.yaml", "model.backbone=nosuch"], "nosuch"),
    "resume not a checkpoint": (["--config", "{w}/config.yaml", "run.name=fresh", "run.resume={w}/empty-dir"],
                                "empty-dir/state.pt: checkpoint file is missing"),
    "weights not a state dict": (["--config", "{w}/config.yaml", "run.name=fresh", "model.pretrained=true",
                                  "model.weights={w}/weights.bin"],
                                 "weights.bin: not a readable weights file"),
    "process count": (["--config", "{w}/config.yaml", "run.num_processes=2"], "expected 2 processes"),
}


def fill(args: list[str], work: Path) -> list[str]:
    return [a.replace("{w}", str(work)) for a in args]


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def one_line(stderr: str, fragment: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("case", list(CLI_MATRIX))
def test_cli_bad_input(work: Path, case: str, monkeypatch) -> None:
    args, fragment = CLI_MATRIX[case]
    monkeypatch.chdir(work)
    before = tree(work)
    result = CliRunner().invoke(app, fill(args, work))
    assert result.exit_code == 2, (result.output, result.exception)
    one_line(result.stderr, fill([fragment], work)[0])
    assert tree(work) == before  # nothing written, not even an empty folder


@pytest.mark.parametrize("case", list(MODULE_MATRIX))
def test_trainer_bad_input(work: Path, case: str, monkeypatch, capsys) -> None:
    args, fragment = MODULE_MATRIX[case]
    monkeypatch.chdir(work)
    before = tree(work)
    assert train.main(fill(args, work)) == 2
    one_line(capsys.readouterr().err, fill([fragment], work)[0])
    assert tree(work) == before
