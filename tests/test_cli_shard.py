"""`fer-dist shard` and `fer-dist inspect` end to end through CliRunner, on the real sources' tiny layouts."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from layouts import make_ckplus, make_fer2013_csv, make_fer2013_folders, make_imagefolder, pixels, write_image
from shard_fixtures import damage_pngs
from typer.testing import CliRunner

from fer_dist.cli import app
from fer_dist.data.manifest import read_manifest
from fer_dist.data.pack import pack
from fer_dist.data.sources.base import SourceOptions

runner = CliRunner()
SMALL_SYNTHETIC = ["--dataset", "synthetic", "--subjects", "3", "--frames", "3", "--size", "32"]
BAD_CASES = ["missing src", "csv columns", "unknown class", "empty folder", "bad split", "split sum",
             "unknown dataset", "channels", "angles", "source option"]


def run(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def leftovers(folder: Path) -> list[str]:
    """Names of temp or old folders pack may have left beside its output."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "shards"
    result = run("shard", *SMALL_SYNTHETIC, "--workers", "1", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_synthetic_shards_then_inspects_and_draws_a_sheet(synthetic: Path, tmp_path: Path) -> None:
    m = read_manifest(synthetic)
    assert m.num_ids == 3 * 6 * 3 and m.image.size == 32 and m.params["align"] == "none"
    assert m.faces["not_attempted"] == m.num_ids
    result = run("inspect", synthetic, "--sheet", tmp_path / "sheet.png", "--per-class", "3")
    assert result.exit_code == 0, result.output
    assert f"verified {len(m.shards())} shards, {m.num_ids} samples" in result.stdout
    assert "unlabelled" in result.stdout and "neutral" in result.stdout
    sheet = cv2.imread(str(tmp_path / "sheet.png"))
    assert sheet is not None and sheet.shape[0] > 8 * 96 and sheet.shape[1] > 3 * 96  # 8 rows of 3 faces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheet.png"]


def test_same_command_gives_identical_bytes_with_any_worker_count(synthetic: Path, tmp_path: Path) -> None:
    result = run("shard", *SMALL_SYNTHETIC, "--workers", "2", "--out", tmp_path / "again")
    assert result.exit_code == 0, result.output
    assert digests(tmp_path / "again") == digests(synthetic)


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar command on this machine")
def test_tar_lists_every_shard_member_in_order(synthetic: Path) -> None:
    for _, info in read_manifest(synthetic).shards():
        listed = subprocess.run(["tar", "tf", str(synthetic / info.file)], capture_output=True, text=True,
                                check=True).stdout.split()
        ids = range(info.first_id, info.first_id + info.count)
        assert listed == [f"{i:08d}.{ext}" for i in ids for ext in ("cls", "json", "png")]


def test_fer2013_image_folders_keep_their_usage_splits(tmp_path: Path) -> None:
    src = make_fer2013_folders(tmp_path / "fer")
    result = run("shard", "--dataset", "fer2013", "--src", src, "--out", tmp_path / "out", "--workers", "1")
    assert result.exit_code == 0, result.output
    m = read_manifest(tmp_path / "out")
    assert {k: v.count for k, v in m.splits.items()} == {"train": 2, "val": 1, "test": 2}
    assert m.source["files"] == 5 and m.skipped == [{"path": "README.md", "reason": "not an image"}]


def test_fer2013_csv_rows_become_samples(tmp_path: Path) -> None:
    src = make_fer2013_csv(tmp_path / "fer2013.csv")
    result = run("shard", "--dataset", "fer2013", "--src", src, "--out", tmp_path / "out", "--workers", "1")
    assert result.exit_code == 0, result.output
    m = read_manifest(tmp_path / "out")
    assert m.num_ids == 5 and m.splits["train"].class_counts == {"anger": 1, "happy": 1}
    with tarfile.open(tmp_path / "out" / m.splits["train"].shards[0].file) as tar:
        png = tar.extractfile("00000000.png").read()
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(decoded, pixels(0, (48, 48)))  # CSV row 0 is the first Training row


def test_ckplus_is_split_by_subject_and_aligned_with_haar_by_default(tmp_path: Path) -> None:
    src = make_ckplus(tmp_path / "ck")
    result = run("shard", "--dataset", "ckplus", "--src", src, "--out", tmp_path / "out", "--workers", "1",
                 "--folds", "2")
    assert result.exit_code == 0, result.output
    m = read_manifest(tmp_path / "out")
    assert m.params["align"] == "haar" and m.faces["detected"] + m.faces["fallback"] == m.num_ids > 0
    subjects: dict[str, set[str]] = {}
    for _, info in m.shards():
        with tarfile.open(tmp_path / "out" / info.file) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    subjects.setdefault(meta["subject"], set()).add((meta["split"], meta["fold"]))
    assert all(len(v) == 1 for v in subjects.values()) and len(subjects) == 2


def test_a_corrupt_image_is_skipped_counted_and_listed(tmp_path: Path) -> None:
    src = make_imagefolder(tmp_path / "faces")
    (src / "joy" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = run("shard", "--dataset", "imagefolder", "--src", src, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    m = read_manifest(tmp_path / "out")
    assert m.num_ids == 3  # a.png, b.PNG, calm/...; contempt and notes.txt left out while listing
    broken = [s for s in m.skipped if s["path"] == "joy/broken.png"]
    assert len(broken) == 1 and broken[0]["reason"].startswith("unreadable")
    assert "joy/broken.png" in result.stdout and "files skipped" in result.stdout


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_file_that_cannot_be_read_is_skipped_and_the_rest_written(tmp_path: Path, workers: str) -> None:
    src = make_imagefolder(tmp_path / "faces")
    (src / "joy" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # listed, then fails to open
    out = tmp_path / "out"
    result = run("shard", "--dataset", "imagefolder", "--src", src, "--out", out, "--workers", workers)
    assert result.exit_code == 0, result.output
    m = read_manifest(out)
    assert m.num_ids == 3 and m.source["files"] == 4
    assert [s["reason"] for s in m.skipped if s["path"] == "joy/gone.png"] == [
        "unreadable: cannot read (No such file or directory)"]


def bad_inputs(tmp: Path) -> dict[str, tuple[list, tuple[str, ...]]]:
    """Name -> (arguments, fragments the one-line error must hold); each builds its own input first."""
    csv = make_fer2013_csv(tmp / "other.csv", header="emotion,pixels,Usage,comment")
    unknown = tmp / "unknown"
    write_image(unknown / "zebra" / "a.png", pixels(1))
    (tmp / "empty").mkdir()
    return {
        "missing src": (["--dataset", "fer2013", "--src", tmp / "nowhere"], ("nowhere", "no such file")),
        "csv columns": (["--dataset", "fer2013", "--src", csv], ("other.csv",)),
        "unknown class": (["--dataset", "imagefolder", "--src", unknown], ("zebra",)),
        "empty folder": (["--dataset", "imagefolder", "--src", tmp / "empty"], ("empty", "no images")),
        "bad split": ([*SMALL_SYNTHETIC, "--split", "0.5,0.4"], ("--split", "0.5,0.4")),
        "split sum": ([*SMALL_SYNTHETIC, "--split", "0.5,0.4,0.4"], ("--split", "sums to 1.3")),
        "unknown dataset": (["--dataset", "mnist"], ("--dataset", "mnist", "synthetic")),
        "channels": ([*SMALL_SYNTHETIC, "--channels", "2"], ("--channels",)),
        "angles": (["--dataset", "rafd", "--src", tmp, "--angles", "ninety"], ("--angles", "ninety")),
        "source option": ([*SMALL_SYNTHETIC, "--frames", "1"], ("--frames",)),
    }


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing_behind(tmp_path: Path, case: str) -> None:
    (tmp_path / "in").mkdir()
    args, fragments = bad_inputs(tmp_path / "in")[case]
    result = run("shard", *args, "--out", tmp_path / "shards" / "out")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "shards").exists() or list((tmp_path / "shards").iterdir()) == []


def test_existing_output_without_overwrite_is_refused_untouched(synthetic: Path) -> None:
    before = digests(synthetic)
    result = run("shard", *SMALL_SYNTHETIC, "--out", synthetic)
    assert_one_line_error(result, str(synthetic), "exists; pass --overwrite")
    assert digests(synthetic) == before and leftovers(synthetic.parent) == []


def damaged_copy(synthetic: Path, tmp_path: Path, damage) -> tuple[Path, str]:
    out = tmp_path / "copy"
    out.mkdir()
    for p in synthetic.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    shard = read_manifest(out).shards()[0][1]
    data = (out / shard.file).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.getmember(f"{shard.first_id + 1:08d}.png")
    (out / shard.file).write_bytes(damage(bytearray(data), member.offset_data + member.size // 2))
    return out, shard.file


@pytest.mark.parametrize(("damage", "what"), [
    (lambda data, at: bytes(data[:at]), "truncated"),
    (lambda data, at: bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]), "differs"),
])
def test_inspect_names_the_shard_and_sample_of_a_damaged_shard(synthetic: Path, tmp_path: Path, damage,
                                                               what: str) -> None:
    out, shard = damaged_copy(synthetic, tmp_path, damage)
    key = f"{read_manifest(out).shards()[0][1].first_id + 1:08d}"
    assert_one_line_error(run("inspect", out), shard, f"sample {key}", what)


def test_inspect_a_folder_that_is_not_a_shard_folder(tmp_path: Path) -> None:
    assert_one_line_error(run("inspect", tmp_path), "manifest.json", "no manifest")


def test_ctrl_c_exits_130_and_removes_the_temp_folder(tmp_path: Path, monkeypatch) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fer_dist.data.imagework.align_face", interrupt)
    result = run("shard", *SMALL_SYNTHETIC, "--workers", "1", "--out", tmp_path / "out")
    assert result.exit_code == 130
    assert list(tmp_path.iterdir()) == []


def test_an_unexpected_error_keeps_its_traceback(tmp_path: Path, monkeypatch) -> None:
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug, not bad input")

    monkeypatch.setattr("fer_dist.data.imagework.align_face", bug)
    result = run("shard", *SMALL_SYNTHETIC, "--workers", "1", "--out", tmp_path / "out")
    assert result.exit_code == 1 and isinstance(result.exception, ZeroDivisionError)
    assert "error:" not in result.stderr and list(tmp_path.iterdir()) == []


def test_console_script_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "fer-dist"
    args = [script, "shard", "--dataset", "mnist", "--out", tmp_path / "x"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: --dataset: unknown data set 'mnist'")


@pytest.mark.slow
def test_default_synthetic_command_needs_no_src_and_gives_16_shards_per_split(tmp_path: Path) -> None:
    result = run("shard", "--dataset", "synthetic", "--out", tmp_path / "synthetic")
    assert result.exit_code == 0, result.output
    m = read_manifest(tmp_path / "synthetic")
    assert m.num_ids == 60 * 6 * 10 and [len(s.shards) for s in m.splits.values()] == [16, 16, 16]
    assert "warning" not in result.stderr


def test_fer2013_without_publictest_warns_no_val_split(tmp_path: Path) -> None:
    """Issue 14: a FER2013 source without PublicTest rows says that training needs another val split."""
    rows = ((0, "Training"), (3, "Training"), (4, "PrivateTest"))
    csv = make_fer2013_csv(tmp_path / "fer2013.csv", rows=rows)
    result = run("shard", "--dataset", "fer2013", "--src", csv, "--out", tmp_path / "out", "--workers", "1",
                 "--no-progress")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: no val split (no PublicTest rows or files), only train, test: training "
                        "needs data.val to name a split of this or another shard folder"], result.stderr


def test_inspect_lists_the_problems_one_per_line(tmp_path: Path) -> None:
    """Issue 14: a shard with many problems lists 20 of them, one a line, and ends in one error line."""
    folder = pack("synthetic", [], tmp_path / "shards", options=SourceOptions(subjects=6, frames=3),
                  samples_per_shard=40, workers=1, progress=False).out
    keys = damage_pngs(folder, 25)
    result = run("inspect", folder)
    assert result.exit_code == 2
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 20 and keys[0] in problems[0] and "train-000000.tar" in problems[0]
    last = result.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("error: ") and f"sample {keys[0]}" in last[0]
    assert "(and 24 more problem(s): 19 listed above, 5 not shown (--problems lists them all))" in last[0]
    everything = run("inspect", folder, "--problems")
    listed = [line for line in everything.stdout.splitlines() if line.startswith("problem: ")]
    assert len(listed) == 25 and all(any(k in line for line in listed) for k in keys)
