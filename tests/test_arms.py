"""Arms share what they do not vary: runs differing only in data.unlabelled train the very same warm-up.

Two real 2-process gloo runs over the same labelled, validation and test shards; one takes its unlabelled
samples from the same folder's test split (the paper's transductive protocol), the other from a second
shard folder with a different number of shards and ids. The warm-up reads no unlabelled sample, so its
checkpoints must be identical to the bit, and the validation accuracies equal.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from shard_fixtures import synthetic_dir
from train_fixtures import train_command

from fer_dist.checkpoint_files import load_checkpoint
from fer_dist.config import DataConfig
from fer_dist.data.augment import InputSpec, train_transform
from fer_dist.data.pack import pack
from fer_dist.data.runset import ShardSet, load_run_data
from fer_dist.data.sources.base import SourceOptions
from fer_dist.data.stream import train_loader

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SPEC = InputSpec(size=8, channels=1, mean=(0.0,), std=(1.0,))


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2)])
def test_a_train_stream_ignores_shards_it_selects_nothing_from(tmp_path, world, workers):
    """Shards with no selected id (X_u's, during the warm-up) leave the epoch's batches alone."""
    synthetic_dir(tmp_path / "x", {"train": [9, 7, 11], "test": [5, 8, 6, 4]})
    ss = ShardSet([(tmp_path / "x", ["train", "test"])])
    include = torch.zeros(ss.num_ids, dtype=torch.bool)
    include[:27] = True  # the train split's ids only
    include[3] = False
    targets = torch.zeros(ss.num_ids, 7)

    def batches(shards):
        out = []
        for rank in range(world):
            stream = train_loader(shards, include, targets, transform=train_transform(SPEC), global_batch=4,
                                  rank=rank, world=world, num_workers=workers, seed=4, epoch=2)
            out.append([(ids.tolist(), images) for images, _, ids in stream])
        return out

    held, every = ss.shards(0)[:3], ss.shards(0)
    a, b, c = batches(held), batches(every), batches(every[::-1])
    for x, y in ((a, b), (a, c)):
        assert [[i for i, _ in r] for r in x] == [[i for i, _ in r] for r in y]
        assert all(torch.equal(p[1], q[1]) for rx, ry in zip(x, y, strict=True)
                   for p, q in zip(rx, ry, strict=True))
    include[3] = True
    assert [[i for i, _ in r] for r in batches(held)] != [[i for i, _ in r] for r in a], "selection matters"


def test_ids_of_labelled_val_and_test_do_not_depend_on_the_unlabelled_folder(tmp_path: Path):
    synthetic_dir(tmp_path / "main", {"train": [6, 5], "val": [4]})
    synthetic_dir(tmp_path / "held", {"test": [5]})
    synthetic_dir(tmp_path / "other", {"train": [9, 9]})
    ref = lambda d, split: [{"dir": str(tmp_path / d), "splits": [split]}]  # noqa: E731
    base = {"labelled": ref("main", "train"), "val": ref("main", "val"), "test": ref("held", "test")}
    a = load_run_data(DataConfig(**base, unlabelled=ref("main", "val")))
    b = load_run_data(DataConfig(**base, unlabelled=ref("other", "train")))
    assert a.num_ids != b.num_ids
    n = a.num_ids
    for part in ("labelled", "val", "test"):
        assert torch.equal(getattr(a, part), getattr(b, part)[:n]) and not getattr(b, part)[n:].any(), part
    assert b.unlabelled[n:].any()


@pytest.mark.slow
@pytest.mark.xdist_group("launch")  # 2-rank launches: a launch slot each (conftest.py)
def test_warm_up_does_not_depend_on_the_unlabelled_set(tmp_path: Path):
    opts = SourceOptions(subjects=12, frames=5)
    pack("synthetic", [], tmp_path / "main", options=opts, samples_per_shard=40, workers=1, progress=False)
    pack("synthetic", [], tmp_path / "other", options=SourceOptions(subjects=8, frames=7, seed=5),
         samples_per_shard=25, workers=1, progress=False)
    ref = lambda d, split: [{"dir": str(tmp_path / d), "splits": [split]}]  # noqa: E731
    base = {
        "data": {"labelled": ref("main", "train"), "val": ref("main", "val"), "test": ref("main", "test"),
                 "num_workers": 1},
        "model": {"backbone": "small_cnn", "pretrained": False, "trainable": "all"},
        "method": {"warmup_epochs": 2, "warmup_patience": 5, "max_rounds": 0, "tau": 0.3},
        "optim": {"lr": 0.002, "batch_size": 16},
        "run": {"dir": str(tmp_path / "runs"), "debug": True, "progress": False, "num_processes": 2},
    }
    arms = {"transductive": ref("main", "test"), "other_folder": ref("other", "train")}
    for name, unlabelled in arms.items():
        config = {**base, "data": {**base["data"], "unlabelled": unlabelled}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        cmd = train_command(tmp_path / f"{name}.yaml", 2, f"run.name={name}")
        result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    runs = [tmp_path / "runs" / name / "checkpoints" for name in arms]
    a_num_ids, b_num_ids = (load_checkpoint(r / "warmup-0002", 0)[0]["state"]["targets"].shape[0]
                            for r in runs)
    assert a_num_ids != b_num_ids, "the two unlabelled sets give the same id space: the test shows nothing"
    for tag in ("warmup-0001", "warmup-0002"):
        a, b = (load_checkpoint(r / tag, 0)[0] for r in runs)
        assert a["model"].keys() == b["model"].keys()
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), f"{tag}: {key} differs"
        assert [h["val/acc"] for h in a["state"]["history"]] == [h["val/acc"] for h in b["state"]["history"]]
        assert a["state"]["step"] == b["state"]["step"]
        # the main folder's ids (X_l, val, test) come first in both id spaces: the same rows, the same targets
        n = min(a_num_ids, b_num_ids)
        assert torch.equal(a["state"]["targets"][:n], b["state"]["targets"][:n])
