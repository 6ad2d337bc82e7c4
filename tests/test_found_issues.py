"""The problems a new user met (issue 14), each reproduced: a FER2013 source without PublicTest rows, the
shard-count warning on small folders, `inspect` on a shard with many problems, and damaged samples under
data.on_error=skip in a real training run. The mistyped shard folder and the empty runs/<name>/ are rows of
tests/test_bad_input.py ("mistyped folder, no --config", "quick start, mistyped folder", "resume not a
checkpoint").
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from fault_fixtures import make_shards, run, train_command, write_config
from layouts import make_fer2013_csv
from typer.testing import CliRunner

from fer_dist.cli import app
from fer_dist.data.pack import MIN_AUTO_SHARD, MIN_SHARDS, pack
from fer_dist.data.sources.base import SourceOptions

runner = CliRunner()


def test_fer2013_without_publictest_warns_no_val_split(tmp_path: Path) -> None:
    rows = ((0, "Training"), (3, "Training"), (4, "PrivateTest"))
    csv = make_fer2013_csv(tmp_path / "fer2013.csv", rows=rows)
    result = runner.invoke(app, ["shard", "--dataset", "fer2013", "--src", str(csv), "--out",
                                 str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: no val split (no PublicTest rows or files), only train, test: training "
                        "needs data.val to name a split of this or another shard folder"], result.stderr


def test_the_shard_count_warning_only_where_loader_workers_would_share(tmp_path: Path) -> None:
    small = pack("synthetic", [], tmp_path / "small", options=SourceOptions(subjects=3, frames=3),
                 workers=1, progress=False)
    assert min(len(s.shards) for s in small.manifest.splits.values()) < MIN_SHARDS
    assert small.warnings == []  # tiny splits: their few shards are the default's choice, read in ms
    big = pack("synthetic", [], tmp_path / "big", options=SourceOptions(subjects=30, frames=2, image_size=16),
               size=16, samples_per_shard=MIN_SHARDS * MIN_AUTO_SHARD, workers=1, progress=False)
    train = big.manifest.splits["train"]
    assert train.count >= MIN_SHARDS * MIN_AUTO_SHARD and len(train.shards) < MIN_SHARDS
    assert [w for w in big.warnings if "'train'" in w] == [
        f"split 'train' has {len(train.shards)} shard(s), fewer than {MIN_SHARDS}: loader workers will share "
        "shards (a smaller --samples-per-shard gives more)"]


def damage_pngs(folder: Path, count: int) -> list[str]:
    """Flip a byte in the PNG of the first `count` samples of the first train shard; their keys."""
    path = folder / "train-000000.tar"
    data = bytearray(path.read_bytes())
    keys = []
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".png") and len(keys) < count:
                data[member.offset_data + member.size // 2] ^= 0x10
                keys.append(member.name.split(".")[0])
    path.write_bytes(bytes(data))
    return keys


def test_inspect_lists_the_problems_one_per_line(tmp_path: Path) -> None:
    folder = pack("synthetic", [], tmp_path / "shards", options=SourceOptions(subjects=6, frames=3),
                  samples_per_shard=40, workers=1, progress=False).out
    keys = damage_pngs(folder, 25)
    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 2
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 20 and keys[0] in problems[0] and "train-000000.tar" in problems[0]
    last = result.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("error: ") and f"sample {keys[0]}" in last[0]
    assert "(and 24 more problem(s): 19 listed above, 5 not shown (--problems lists them all))" in last[0]
    everything = runner.invoke(app, ["inspect", str(folder), "--problems"])
    listed = [line for line in everything.stdout.splitlines() if line.startswith("problem: ")]
    assert len(listed) == 25 and all(any(k in line for line in listed) for k in keys)


@pytest.mark.slow
def test_damaged_samples_are_skipped_and_counted_or_named(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards")
    keys = damage_pngs(shards, 2)
    cfg = write_config(tmp_path, shards, method={"warmup_epochs": 1, "self_training": False})
    refused = run(train_command(cfg, 1, "run.name=raise"), tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {shards / 'train-000000.tar'}: sample {keys[0]} differs from the manifest's digest (damaged "
        "after sharding)")
    skipped = run(train_command(cfg, 1, "run.name=skip", "data.on_error=skip"), tmp_path)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "data.on_error=skip: left out 2 damaged sample(s) or shard(s), the first: " in skipped.stderr
    records = [json.loads(line) for line in (tmp_path / "runs/skip/metrics.jsonl").read_text().splitlines()]
    assert any(r.get("data/skipped") == 2 for r in records)
    shutil.rmtree(tmp_path / "runs")
