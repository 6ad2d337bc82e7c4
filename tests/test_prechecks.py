"""What a launch would refuse is found before it: `fer-dist train --dry-run` reports it, the real launch
fails with the same one line and leaves no run folder. Plus the CLI's words: --help without Python types,
one-line usage errors, suggestions for mistyped keys, `slurm submit` and `compare` checking first, and the
CLI's import not loading torch (what keeps --help and these errors instant; timed in
tools/bench/bench_cli.py, not here).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fer_dist import stopsignals
from fer_dist.cli import app
from fer_dist.data.pack import pack
from fer_dist.data.sources.base import SourceOptions

runner = CliRunner()
FER_DIST = str(Path(sys.executable).parent / "fer-dist")
HEAVY = ("torch", "webdataset", "cv2", "matplotlib", "accelerate", "onnx")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny shard folder and a config over it (runs under work/runs)."""
    root = tmp_path_factory.mktemp("prechecks")
    shards = root / "shards"
    pack("synthetic", [], shards, options=SourceOptions(subjects=3, frames=3, image_size=32), size=32,
         samples_per_shard=16, workers=1, progress=False)
    ref = lambda split: [{"dir": str(shards), "splits": [split]}]  # noqa: E731
    config = {"data": {"labelled": ref("train"), "unlabelled": ref("train"), "val": ref("val"),
                       "num_workers": 0},
              "model": {"backbone": "small_cnn", "pretrained": False, "trainable": "all", "input_size": 32},
              "optim": {"batch_size": 16}, "run": {"dir": str(root / "runs"), "name": "r", "progress": False}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "not-a-checkpoint.pt").write_bytes(b"just bytes")
    return root


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def fer_dist(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FER_DIST, *args], cwd=work, capture_output=True, text=True, timeout=120)


PRECHECKS = {
    "batch size": (["--processes", "2", "optim.batch_size=33"], "optim.batch_size: 33 does not split evenly"),
    "resume not a checkpoint": (["run.resume={work}/not-a-checkpoint.pt"], "is a file, not a checkpoint"),
    "resume a folder": (["run.resume={work}/shards"], "is not a checkpoint folder"),
    "sync_bn on the CPU": (["--processes", "2", "model.sync_bn=true"],
                           "model.sync_bn: SyncBatchNorm needs GPUs"),
    "processes 0": (["--processes", "0"], "--processes: expected 1 or more, got 0"),
    "mistyped key": (["method.taw=0.8"], "did you mean 'method.tau'?"),
}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "launch"])
@pytest.mark.parametrize("case", list(PRECHECKS))
def test_a_launch_is_refused_before_it_starts_in_one_line(work: Path, case: str, dry_run: bool) -> None:
    if case == "sync_bn on the CPU":
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available():
            pytest.skip("this machine has GPUs: sync_bn is allowed")
    extra, fragment = PRECHECKS[case]
    args = ["train", "--config", str(work / "config.yaml"), *[a.format(work=work) for a in extra]]
    result = fer_dist(work, *args, *(["--dry-run"] if dry_run else []))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert fragment in one_line(result.stderr)
    assert not (work / "runs").exists()  # no run folder, not even an empty one


def test_the_dry_run_of_a_good_launch_prints_the_command(work: Path) -> None:
    result = runner.invoke(app, ["train", "--config", str(work / "config.yaml"), "--processes", "2",
                                 "--dry-run"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "--num_processes 2" in result.output and not (work / "runs").exists()


def test_the_cli_imports_nothing_heavy() -> None:
    code = f"import sys, fer_dist.cli; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported at `import fer_dist.cli`: {result.stdout}"


def _commands() -> list[list[str]]:
    return [[c] for c in ("shard", "inspect", "train", "eval", "intensity", "compare", "predict", "export",
                          "cv")] + [["slurm", "submit"], ["slurm"], []]


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c) or "fer-dist")
def test_help_shows_plain_words(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for python_type in ("<bool>", "<list[", "<int>", "<path>", "<str>", "<float>", "METHOD.md"):
        assert python_type not in result.output, (python_type, result.output)


@pytest.mark.parametrize("command", [c for c in _commands() if c not in ([], ["slurm"])]
                         + [["experiment", "run"], ["experiment", "report"], ["experiment", "submit"]],
                         ids=" ".join)
def test_every_command_help_ends_with_an_example(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"Example: fer-dist {' '.join(command)} " in result.output or \
        f"Example: fer-dist {' '.join(command)}\n" in result.output.replace(" \n", "\n"), result.output


def test_inspect_seed_is_the_sheets_seed() -> None:
    result = runner.invoke(app, ["inspect", "--help"], env={"COLUMNS": "200"})
    line = next(x for x in result.output.splitlines() if "--seed" in x)
    assert "contact sheet" in line and "splits" not in line


@pytest.mark.parametrize("args, fragment", [
    (["eval", "somewhere"], "Missing option '--shards'"),
    (["evl"], "Did you mean 'eval'?"),
    (["train", "--procesess", "2"], "--processes"),
])
def test_usage_errors_are_one_line(args: list[str], fragment: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert fragment in one_line(result.stderr)


def test_slurm_submit_without_sbatch_writes_nothing(work: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["slurm", "submit", "--config", str(work / "config.yaml"), "--script-dir",
                                 str(tmp_path / "scripts")], env={"PATH": str(tmp_path / "empty")})
    assert result.exit_code == 2 and "sbatch: not found" in one_line(result.stderr)
    assert result.stdout == "" and not (tmp_path / "scripts").exists()


def test_slurm_header_names_the_gpus_asked_for(work: Path) -> None:
    result = runner.invoke(app, ["slurm", "submit", "--config", str(work / "config.yaml"), "--gpus-per-node",
                                 "4", "--dry-run"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "(#SBATCH below: 4)" in result.output and "(#SBATCH below: 8)" not in result.output
    cpu = runner.invoke(app, ["slurm", "submit", "--config", str(work / "config.yaml"), "--cpu", "--dry-run",
                              "--gpus-per-node", "2"])
    assert "(#SBATCH below: none, CPU ranks)" in cpu.output


def test_slurm_submit_adds_its_script_beside_a_strangers_files(work: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 4242\n")
    (bin_dir / "sbatch").chmod(0o755)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "notes.txt").write_text("keep")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    base = ["slurm", "submit", "--config", str(work / "config.yaml"), "--script-dir"]
    for _ in range(2):
        result = runner.invoke(app, [*base, str(scripts)], env=env)
        assert result.exit_code == 0 and "submitted job 4242" in result.output, result.output
    assert (scripts / "notes.txt").read_text() == "keep" and len(list(scripts.glob("*.sbatch"))) == 2
    refused = runner.invoke(app, [*base, str(scripts / "notes.txt")], env=env)
    assert refused.exit_code == 2 and "is a file, not a folder" in one_line(refused.stderr)


def test_compare_refuses_the_same_run_twice(work: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    (run / "metrics.jsonl").write_text("")
    for twice in ([str(run), str(run)], [str(run), str(tmp_path / "." / "run")]):
        result = runner.invoke(app, ["compare", *twice, "--out", str(tmp_path / "cmp")])
        assert result.exit_code == 2 and "name each run once" in one_line(result.stderr)
    assert not (tmp_path / "cmp").exists()


def test_compare_shows_how_many_processes_each_run_had(tmp_path: Path) -> None:
    for name, processes in (("one", 1), ("two", 2)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"run": {"name": name}}))
        (run / "metrics.jsonl").write_text("")
        (run / "summary.json").write_text(json.dumps({"processes": processes}))
    result = runner.invoke(app, ["compare", str(tmp_path / "one"), str(tmp_path / "two"), "--out",
                                 str(tmp_path / "cmp")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, (result.output, result.exception)
    assert "processes" in result.output
    runs = json.loads((tmp_path / "cmp/compare.json").read_text())["runs"]
    assert [r["processes"] for r in runs] == [1, 2]


def test_a_ctrl_c_stays_the_reason_when_the_launcher_forwards_it() -> None:
    with stopsignals.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C
        os.kill(os.getpid(), signal.SIGUSR1)  # the launcher's forwarded request
        assert stop.requested and stop.signal_name == "SIGINT"
