"""Every command's every output path, in every state a user may leave it: nothing that is not the command's
own earlier output is ever replaced, and a refusal is one line, exit code 2, the tree untouched.

The matrix: each (command, path option) x {missing, missing parent, a stranger's file there, a stranger's
folder there, an earlier output of the command, that output with a stranger's file added, another
command's output, unwritable (under a regular file: root can write anywhere else)} x {without, with
--overwrite}. Each case compares the whole tree before and after byte for byte. The inputs (shards, a tiny
untrained model, two run folders) are built once per module; every case writes only into its tmp_path.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from fer_dist import outputs
from fer_dist.cli import app
from fer_dist.data.manifest import read_manifest
from fer_dist.data.pack import pack
from fer_dist.data.sources.base import SourceOptions
from fer_dist.models import ModelSpec, build_model, export_model, preprocessing_of

runner = CliRunner()
STRANGER = b"a stranger's notes: must survive every command\n"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Shards (32 px synthetic, with sequences), an untrained model's export, two run folders, images."""
    root = tmp_path_factory.mktemp("outputs-inputs")
    shards = root / "shards"
    pack("synthetic", [], shards, options=SourceOptions(subjects=3, frames=3, image_size=32), size=32,
         samples_per_shard=16, workers=1, progress=False)
    net = build_model(ModelSpec(backbone="small_cnn", pretrained=False, trainable="all", input_size=32))
    model = export_model(net, root / "model", preprocessing=preprocessing_of(read_manifest(shards)))
    config = {"data": {"labelled": [{"dir": str(shards), "splits": ["train"]}],
                       "val": [{"dir": str(shards), "splits": ["val"]}]},
              "model": {"backbone": "small_cnn", "pretrained": False}, "run": {"name": "a"}}
    for name, tau in (("a", 0.7), ("b", 0.5)):
        run = root / "runs" / name
        (run / "checkpoints").mkdir(parents=True)
        config["run"]["name"], config["method"] = name, {"tau": tau}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        (run / "metrics.jsonl").write_text(json.dumps({"kind": "warmup", "warmup": 1, "val/acc": 0.5}) + "\n")
        (run / "summary.json").write_text(json.dumps({"processes": 1, "rounds": 0}))
        shutil.copytree(model, run / "best")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(images / f"face{i}.png"), rng.integers(0, 255, (32, 32), dtype=np.uint8))
    return {"root": root, "shards": shards, "model": model, "run_a": root / "runs/a",
            "run_b": root / "runs/b", "images": images}


# command -> (arguments with {out} for the path under test, folder or file output, a file name for it)
SPECS: dict[str, tuple[Callable[[dict[str, Path]], list[str]], str, str]] = {
    "shard --out": (lambda i: ["shard", "--dataset", "synthetic", "--subjects", "2", "--frames", "3",
                               "--size", "32", "--workers", "1", "--no-progress", "--out", "{out}"], "folder",
                    "shards"),
    "inspect --sheet": (lambda i: ["inspect", str(i["shards"]), "--no-verify", "--per-class", "2", "--sheet",
                                   "{out}"], "file", "sheet.png"),
    "eval --out": (lambda i: ["eval", str(i["model"]), "--shards", str(i["shards"]), "--out", "{out}"],
                   "folder", "eval-out"),
    "intensity --out": (lambda i: ["intensity", str(i["model"]), "--shards", f"{i['shards']}:train,val,test",
                                   "--out", "{out}"], "folder", "intensity-out"),
    "compare --out": (lambda i: ["compare", str(i["run_a"]), str(i["run_b"]), "--out", "{out}"], "folder",
                      "compare-out"),
    "predict --out": (lambda i: ["predict", str(i["model"]), str(i["images"]), "--out", "{out}"], "file",
                      "rows.csv"),
}
CASES = ["missing", "missing parent", "stranger's file", "stranger's folder", "earlier output",
         "earlier output + stranger's file", "another command's output", "unwritable"]
# the cases a command may write in (with --overwrite: also over its own earlier output)
WRITES = {"missing", "missing parent"}


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def invoke(args: list[str]):
    return runner.invoke(app, args)


_EARLIER: dict[str, Path] = {}


def earlier_output(spec: str, inputs: dict[str, Path], tmp_path_factory) -> Path:
    """An output of `spec`'s command written by the command itself (once per module)."""
    if spec not in _EARLIER:
        make, _, name = SPECS[spec]
        out = tmp_path_factory.mktemp("earlier") / name
        result = invoke([a.format(out=out) for a in make(inputs)])
        assert result.exit_code == 0, (result.output, result.exception)
        _EARLIER[spec] = out
    return _EARLIER[spec]


def place(case: str, spec: str, root: Path, inputs: dict[str, Path], tmp_path_factory) -> Path:
    """Set up `case` under `root`; returns the path to give the command."""
    _, kind, name = SPECS[spec]
    out = root / name
    if case == "missing parent":
        return root / "new" / "deeper" / name
    if case == "stranger's file":
        out.write_bytes(STRANGER)
    elif case == "stranger's folder":
        out.mkdir()
        (out / "notes.txt").write_bytes(STRANGER)
    elif case.startswith("earlier output"):
        src = earlier_output(spec, inputs, tmp_path_factory)
        (shutil.copytree if kind == "folder" else shutil.copy2)(src, out)
        if case.endswith("stranger's file"):
            if kind == "file":  # a file cannot hold another; the stranger's file sits where it is named
                out.write_bytes(STRANGER)
            else:
                (out / "notes.txt").write_bytes(STRANGER)
    elif case == "another command's output":
        other = "compare --out" if spec != "compare --out" else "eval --out"
        if kind == "file":
            other = "predict --out" if spec != "predict --out" else "inspect --sheet"
        src = earlier_output(other, inputs, tmp_path_factory)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, out)
    elif case == "unwritable":
        (root / "plain-file").write_bytes(STRANGER)
        return root / "plain-file" / name
    return out


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("spec", list(SPECS))
def test_an_output_replaces_only_the_commands_own_earlier_output(
        spec: str, case: str, overwrite: bool, inputs: dict[str, Path], tmp_path: Path,
        tmp_path_factory) -> None:
    make, kind, _ = SPECS[spec]
    out = place(case, spec, tmp_path, inputs, tmp_path_factory)
    before, inputs_before = snapshot(tmp_path), snapshot(inputs["root"])
    args = [a.format(out=out) for a in make(inputs)] + (["--overwrite"] if overwrite else [])
    result = invoke(args)
    after = snapshot(tmp_path)
    assert snapshot(inputs["root"]) == inputs_before  # the inputs are never written
    assert not [p for p in after if ".tmp-" in p], after  # nothing half-written left behind
    allowed = case in WRITES or (overwrite and case == "earlier output")
    if not allowed:
        assert result.exit_code == 2, (result.output, result.exception)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert after == before
        return
    assert result.exit_code == 0, (result.output, result.exception)
    rel = str(out.relative_to(tmp_path))
    assert out.is_dir() if kind == "folder" else out.is_file()
    untouched = {p: b for p, b in before.items() if p != rel and not p.startswith(rel + "/")}
    assert {p: b for p, b in after.items() if p in untouched} == untouched  # nothing else changed
    made = {p for p in after if p not in before}
    assert all(p == rel or p.startswith(rel + "/") or rel.startswith(p + "/") for p in made), made
    if kind == "folder" and spec != "shard --out":
        marker = json.loads((out / outputs.MARKER).read_text())
        assert marker["command"] == spec.split()[0]
        assert sorted([*marker["files"], outputs.MARKER]) == sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize("command", ["eval", "intensity"])
def test_a_default_output_of_another_input_is_refused_then_replaced_with_overwrite(
        command: str, inputs: dict[str, Path], tmp_path: Path) -> None:
    run = shutil.copytree(inputs["run_a"], tmp_path / "run")
    first, second = f"{inputs['shards']}:train,val,test", f"{inputs['shards']}:test"
    assert invoke([command, str(run), "--shards", first]).exit_code == 0
    dest = run / command
    before = snapshot(tmp_path)
    refused = invoke([command, str(run), "--shards", second])
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert f"{dest}: exists; pass --overwrite" in refused.stderr and "train+val+test" in refused.stderr
    assert snapshot(tmp_path) == before
    assert invoke([command, str(run), "--shards", second, "--overwrite"]).exit_code == 0
    assert "shards:test" in json.loads((dest / outputs.MARKER).read_text())["about"]


def test_eval_into_runs_never_deletes_them(inputs: dict[str, Path], tmp_path: Path) -> None:
    runs = shutil.copytree(inputs["root"] / "runs", tmp_path / "runs")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        result = invoke(["eval", str(inputs["model"]), "--shards", str(inputs["shards"]), "--out", str(runs),
                         *extra])
        assert result.exit_code == 2 and "not replacing it" in result.stderr, result.stderr
    assert snapshot(tmp_path) == before


def test_an_empty_folder_made_for_the_output_is_filled(inputs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "cmp").mkdir()
    result = invoke(["compare", str(inputs["run_a"]), str(inputs["run_b"]), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cmp" / "compare.json").is_file()


def test_a_folder_at_a_file_output_is_named_in_one_line(inputs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "p.csv").mkdir()
    result = invoke(["predict", str(inputs["model"]), str(inputs["images"]), "--out",
                     str(tmp_path / "p.csv")])
    assert result.exit_code == 2 and "is a folder; name a file" in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing parent", "stranger's file", "stranger's folder", "earlier output",
                                  "unwritable"])
def test_export_onnx_replaces_only_its_own_earlier_file(case: str, inputs: dict[str, Path],
                                                        tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    base = ["export", str(inputs["model"]), "--shards", f"{inputs['shards']}:val"]
    out = tmp_path / "m.onnx"
    if case == "missing parent":
        out = tmp_path / "new" / "m.onnx"
    elif case == "stranger's file":
        out.write_bytes(STRANGER)
    elif case == "stranger's folder":
        out.mkdir()
        (out / "notes.txt").write_bytes(STRANGER)
    elif case == "earlier output":
        assert invoke([*base, "--onnx", str(out)]).exit_code == 0
    else:
        (tmp_path / "plain").write_bytes(STRANGER)
        out = tmp_path / "plain" / "m.onnx"
    for overwrite in (False, True):
        before = snapshot(tmp_path)
        result = invoke([*base, "--onnx", str(out), *(["--overwrite"] if overwrite else [])])
        # a missing parent is made and the file written; the second pass finds that export, its own, and
        # --overwrite replaces it
        writes = case == "missing parent" or case == "earlier output" and overwrite
        if writes:
            assert result.exit_code == 0, (result.output, result.exception)
            assert f"wrote {out} " in result.output and out.is_file()
        else:
            assert result.exit_code == 2, (result.output, result.exception)
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert snapshot(tmp_path) == before
        assert not [p for p in snapshot(tmp_path) if ".tmp-" in p]


def test_predict_says_unreadable_not_without_a_face(inputs: dict[str, Path], tmp_path: Path) -> None:
    images = shutil.copytree(inputs["images"], tmp_path / "images")
    (images / "broken.png").write_bytes(b"not a png")
    result = invoke(["predict", str(inputs["model"]), str(images)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "2 faces classified, 1 unreadable" in result.output and "without a face" not in result.output
