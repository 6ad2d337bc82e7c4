"""The label-scarce experiment's pieces: labelled shares, pseudo targets, floored thresholds, the selection's
precision on hidden labels, strong augmentation, the budget-matched stop rule and the shared warm-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fer_dist import method
from fer_dist.config import MethodConfig, load_config, pseudo_target_mode
from fer_dist.data.augment import strong_augment
from fer_dist.data.pack import pack
from fer_dist.data.runset import load_run_data, share_mask
from fer_dist.data.sources.base import SourceOptions
from fer_dist.errors import FerDistError

# ---------------------------------------------------------------- shares


def test_share_mask_is_stratified_nested_and_keyed() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20 + [-1] * 10)
    mask = torch.ones(110, dtype=torch.bool)
    local = torch.arange(110)
    small = share_mask(mask, labels, local, 0.1, seed=3)
    large = share_mask(mask, labels, local, 0.4, seed=3)
    # per class floor(share * n + 0.5): 5, 3, 2 and 1 of the unlabelled "class"
    assert [int((small & (labels == c)).sum()) for c in (0, 1, 2, -1)] == [5, 3, 2, 1]
    assert [int((large & (labels == c)).sum()) for c in (0, 1, 2, -1)] == [20, 12, 8, 4]
    assert not bool((small & ~large).any())  # nested: X_l at 0.1 lies inside the 0.4 subset
    assert torch.equal(small, share_mask(mask, labels, local, 0.1, seed=3))
    assert not torch.equal(small, share_mask(mask, labels, local, 0.1, seed=4))
    # the draw depends on the ids within the folder, not on where the folder sits in the run's id space
    shifted = share_mask(torch.cat([torch.zeros(7, dtype=torch.bool), mask]),
                         torch.cat([torch.zeros(7, dtype=torch.long), labels]),
                         torch.cat([torch.arange(7), local]), 0.1, seed=3)
    assert torch.equal(shifted[7:], small)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scarce") / "shards"
    pack("synthetic", [], out, options=SourceOptions(subjects=12, frames=5), workers=1, progress=False)
    return out


def _data(shards: Path, share_l: float, share_u: float) -> dict:
    ref = lambda split, share=None: [{"dir": str(shards), "splits": [split], "share": share}]  # noqa: E731
    return {"labelled": ref("train", share_l), "unlabelled": ref("train", share_u), "val": ref("val"),
            "test": ref("test"), "num_workers": 0}


def test_shares_give_x_l_inside_x_u_pool_with_one_subset_per_seed(shards: Path) -> None:
    cfg = load_config(None, [f"data={json.dumps(_data(shards, 0.5, 0.8))}", "model.backbone=small_cnn",
                             "model.pretrained=false"])
    a, b = load_run_data(cfg.data, 0), load_run_data(cfg.data, 1)
    train = int((a.labels >= 0).sum())  # every synthetic split has labelled and unlabelled frames
    assert 0 < int(a.labelled.sum()) < train
    assert not bool((a.labelled & a.unlabelled).any())
    assert int(a.labelled.sum()) == int(b.labelled.sum()) and not torch.equal(a.labelled, b.labelled)
    fixed = cfg.data.model_copy(update={"subset_seed": 5})
    assert torch.equal(load_run_data(fixed, 0).labelled, load_run_data(fixed, 1).labelled)


# ---------------------------------------------------------------- the method's options


def test_pseudo_targets_soft_hard_sharpen() -> None:
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    assert torch.equal(method.pseudo_targets(p, "soft"), p)
    assert torch.equal(method.pseudo_targets(p, "hard"), torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    sharp = method.pseudo_targets(p, "sharpen", 0.5)
    expect = p**2 / (p**2).sum(1, keepdim=True)
    assert torch.allclose(sharp, expect, atol=1e-6)
    assert torch.allclose(method.pseudo_targets(p, "sharpen", 1.0), p, atol=1e-6)
    with pytest.raises(ValueError):
        method.pseudo_targets(p, "sharpen", 0.0)


def test_pseudo_target_mode_parses_and_the_config_names_bad_values() -> None:
    assert pseudo_target_mode("soft") == ("soft", None)
    assert pseudo_target_mode("sharpen:0.5") == ("sharpen", 0.5)
    for bad in ("sharpen", "sharpen:-1", "hard:2", "argmax"):
        with pytest.raises(ValueError):
            pseudo_target_mode(bad)
    with pytest.raises(FerDistError, match="method.pseudo_targets"):
        load_config(None, ["method.pseudo_targets=sharpen:x"])
    assert MethodConfig(pseudo_targets="sharpen:0.5").pseudo_targets == "sharpen:0.5"


def test_rewrite_gives_confident_rows_hard_targets() -> None:
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.5, 0.4, 0.1]])
    labels = torch.tensor([-1, -1])
    rw = method.rewrite_targets(probs, labels, torch.zeros(2, 3), tau=0.7, alpha=None, pseudo=("hard", None))
    assert torch.equal(rw.targets, torch.tensor([[1.0, 0, 0], [0, 0, 0]]))


def test_class_thresholds_floor_holds_adaptive_thresholds_up() -> None:
    # class 1's correct labelled predictions are unsure (0.4): unfloored its threshold is 0.4
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.3, 0.4, 0.3], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 1, 2])
    free = method.class_thresholds(probs, labels, tau=0.7, mode="class_adaptive")
    floored = method.class_thresholds(probs, labels, tau=0.7, mode="class_adaptive", floor=0.5)
    assert free.tolist() == pytest.approx([0.9, 0.4, 0.8])
    assert floored.tolist() == pytest.approx([0.9, 0.5, 0.8])


def test_selection_quality_counts_per_predicted_class_against_hidden_labels() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.95, 0.05], [0.6, 0.4]])
    hidden = torch.tensor([0, 1, 1, -1, 0])
    confident = torch.tensor([True, True, True, True, False])
    q = method.selection_quality(probs, hidden, confident)
    assert q.count == [3, 1]          # three predicted 0 (one with no known label), one predicted 1
    assert q.correct == [1, 1]
    assert q.precision == pytest.approx(2 / 3)  # over the three with a hidden label
    assert q.per_class() == pytest.approx([1 / 3, 1.0])
    none = method.selection_quality(probs, hidden, torch.zeros(5, dtype=torch.bool))
    assert none.precision is None and none.per_class() == [None, None]


def test_strong_augment_is_keyed_by_seed_epoch_and_id() -> None:
    torch.manual_seed(0)
    faces = torch.randint(0, 256, (4, 3, 48, 48), dtype=torch.uint8)
    ids = torch.tensor([3, 9, 12, 40])
    state = torch.get_rng_state()
    a = strong_augment(faces, ids, "trivialaugment", seed=1, epoch=2)
    assert torch.equal(torch.get_rng_state(), state)  # the run's generator is untouched
    assert torch.equal(a, strong_augment(faces, ids, "trivialaugment", seed=1, epoch=2))
    # a face's view depends on its own id only, not on its neighbours in the batch
    assert torch.equal(a[1:2], strong_augment(faces[1:2], ids[1:2], "trivialaugment", seed=1, epoch=2))
    later = strong_augment(faces, ids, "trivialaugment", seed=1, epoch=3)
    assert not torch.equal(a, later) and not torch.equal(a, faces)
    assert a.dtype == torch.uint8 and a.shape == faces.shape
    with pytest.raises(FerDistError, match="unlabelled_augment"):
        strong_augment(faces, ids, "cutout", seed=1, epoch=2)


# ---------------------------------------------------------------- the budget and the shared warm-up


def _config(root: Path, shards: Path, **method_keys) -> Path:
    config = {
        "data": _data(shards, 0.5, 1.0),
        "model": {"backbone": "small_cnn", "pretrained": False, "trainable": "all"},
        "method": {"warmup_epochs": 2, "warmup_patience": 5, "max_rounds": 3, "tau": 0.3,
                   "stop_rule": "none", **method_keys},
        "optim": {"lr": 0.002, "batch_size": 16},
        "run": {"dir": str(root / "runs"), "progress": False},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fer_dist.train", "--config", str(config), *overrides],
                          capture_output=True, text=True, timeout=300)


def _rounds(run: Path) -> list[dict]:
    """The run's logged epochs and rounds without what varies between two identical runs (time, rates)."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") in ("warmup", "round", "test"):
            out.append({k: v for k, v in rec.items() if not k.startswith(("time/", "gather/", "wall"))
                        and k not in ("time", "elapsed_s", "t")})
    return out


@pytest.mark.slow
def test_an_arm_started_from_a_shared_warmup_ends_exactly_as_one_that_trained_its_own(
        tmp_path: Path, shards: Path) -> None:
    config = _config(tmp_path, shards)
    own = _train(config, "run.name=own")
    assert own.returncode == 0, own.stderr[-2000:]
    warm = _train(config, "run.name=warm", "method.self_training=false")
    assert warm.returncode == 0, warm.stderr[-2000:]
    shared = _train(config, "run.name=shared", f"run.warmup_from={tmp_path / 'runs/warm'}")
    assert shared.returncode == 0, shared.stderr[-2000:]
    runs = tmp_path / "runs"
    assert _rounds(runs / "shared") == _rounds(runs / "own")
    a, b = (json.loads((runs / name / "summary.json").read_text()) for name in ("own", "shared"))
    for key in ("warmup_epochs", "rounds", "best", "best_val", "test_acc_of_best", "steps", "rule_stop_round",
                "warmup_end", "labelled_per_class"):
        assert a[key] == b[key], key
    # the budget: stop_rule none ran every round whatever the moving average did
    assert a["rounds"] == 3 and a["stop_reason"] == "max_rounds (3)"
    assert a["warmup_end"] == "cap"  # 2 epochs, patience 5: the cap ended it, and the record says so
    # a warm-up of another learning rate is refused with one line naming the key, and leaves no run
    other = _train(config, "run.name=other", "optim.lr=0.001", f"run.warmup_from={runs / 'warm'}")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].startswith("error: run.warmup_from:")
    assert "optim.lr" in other.stderr
    assert not (runs / "other").exists()
