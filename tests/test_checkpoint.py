"""fer_dist/checkpoint.py: round trips, RNG, atomic layout, pruning, weights_only, and a 2-process save."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import dist_worker
import numpy as np
import pytest
import torch

from fer_dist import __version__
from fer_dist import checkpoint_files as checkpoint
from fer_dist.checkpoint_files import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    restore_rng,
    save_checkpoint,
)
from fer_dist.dist import make_accelerator
from fer_dist.errors import FerDistError


@pytest.fixture(scope="module")
def acc() -> Any:
    return make_accelerator()


def _state(i: int = 0) -> dict[str, Any]:
    return {
        "model": {"w": torch.arange(6.0).reshape(2, 3) + i, "b": torch.zeros(3, dtype=torch.bfloat16)},
        "targets": torch.linspace(0, 1, 35, dtype=torch.float64).reshape(5, 7) * i,
        "round": i,
        "history": [{"kind": "round", "val/acc": 0.5 + i / 100}, {"kind": "warmup", "val/acc": None}],
        "best_metric": 0.61,
        "pair": (1, "two", 3.0),
        "flags": [True, False],
        "dtype": torch.float32,
        "nothing": None,
        "offsets": {"shards/a": 0, "shards/b": 1234},
        "seen": {3, 4},
        "size": torch.Size([2, 3]),
    }


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


def test_round_trip(acc: Any, tmp_path: Path) -> None:
    state = _state(3)
    path = save_checkpoint(acc, tmp_path, "round-0003", state, meta={"step": 120})
    assert path == tmp_path / "checkpoints" / "round-0003"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "rng-rank0.pt", "state.pt"]
    loaded, rng = load_checkpoint(path, 0)
    _assert_same(state, loaded)
    assert rng is not None and set(rng) >= {"python", "numpy", "torch"}
    meta = read_meta(path)
    assert meta["tag"] == "round-0003" and meta["round"] == 3 and meta["step"] == 120
    assert meta["world_size"] == 1 and meta["best_metric"] == 0.61
    assert meta["fer_dist_version"] == __version__ and meta["time"].endswith("+00:00")


def test_state_on_an_accelerator_device_loads_on_cpu(acc: Any, tmp_path: Path) -> None:
    path = save_checkpoint(acc, tmp_path, "t", {"w": torch.ones(2, device=acc.device)})
    assert load_checkpoint(path, 0)[0]["w"].device.type == "cpu"


def _draws() -> list[Any]:
    return [random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()),
            torch.rand(3).tolist(), torch.randint(100, (2,)).tolist()]


def test_rng_capture_restore_replays_draws() -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    random.gauss(0, 1)  # leaves a cached Gaussian in python's state
    np.random.randn()   # and numpy's: both cached values must round-trip
    saved = capture_rng()
    first = _draws()
    restore_rng(saved)
    assert _draws() == first


def test_rng_survives_a_weights_only_round_trip(acc: Any, tmp_path: Path) -> None:
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    path = save_checkpoint(acc, tmp_path, "r", {"x": 1})
    first = _draws()
    _draws()
    restore_rng(load_checkpoint(path, 0)[1])
    assert _draws() == first


def test_leftover_temp_dir_is_ignored_then_cleaned(acc: Any, tmp_path: Path) -> None:
    save_checkpoint(acc, tmp_path, "round-0001", _state(1))
    root = tmp_path / "checkpoints"
    crashed = root / ".tmp-round-0002"
    crashed.mkdir()
    (crashed / "rng-rank0.pt").write_bytes(b"half")
    (root / ".tmp-latest").write_text("round-0002\n")
    assert latest_checkpoint(tmp_path) == root / "round-0001"
    save_checkpoint(acc, tmp_path, "round-0003", _state(3))
    assert latest_checkpoint(tmp_path) == root / "round-0003"
    assert not list(root.glob(".tmp-*"))
    assert (root / "latest").read_text() == "round-0003\n"


def test_latest_falls_back_when_it_names_an_incomplete_dir(acc: Any, tmp_path: Path) -> None:
    save_checkpoint(acc, tmp_path, "a", _state(1))
    save_checkpoint(acc, tmp_path, "b", _state(2))
    root = tmp_path / "checkpoints"
    (root / "b" / "state.pt").unlink()  # as if lost between the rename and the pointer update
    assert latest_checkpoint(tmp_path) == root / "a"
    (root / "latest").write_text("gone\n")
    assert latest_checkpoint(tmp_path) == root / "a"


def test_no_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    assert latest_checkpoint(tmp_path) is None


def test_keep_last_prunes_in_save_order_and_keeps_best(acc: Any, tmp_path: Path) -> None:
    # Tags whose names sort the other way round: the order is the save order, not the names'.
    for i, tag in enumerate(["z-first", "y-second", "x-third", "w-fourth"]):
        save_checkpoint(acc, tmp_path, tag, _state(i), keep_last=2, is_best=tag == "z-first")
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["best", "index.json", "latest", "w-fourth", "x-third"]
    index = json.loads((root / "index.json").read_text())
    assert index["tags"] == ["x-third", "w-fourth"] and index["best"] == "z-first"
    assert read_meta(root / "best")["tag"] == "z-first"
    _assert_same(load_checkpoint(root / "best", 0)[0], _state(0))
    assert latest_checkpoint(tmp_path) == root / "w-fourth"


def test_best_is_hard_linked_and_replaced(acc: Any, tmp_path: Path) -> None:
    save_checkpoint(acc, tmp_path, "a", _state(1), is_best=True)
    save_checkpoint(acc, tmp_path, "b", _state(2), is_best=True)
    root = tmp_path / "checkpoints"
    assert os.path.samefile(root / "best" / "state.pt", root / "b" / "state.pt")
    assert read_meta(root / "best")["tag"] == "b"


def test_resaving_a_tag_replaces_it_and_moves_it_last(acc: Any, tmp_path: Path) -> None:
    save_checkpoint(acc, tmp_path, "a", _state(1), keep_last=2)
    save_checkpoint(acc, tmp_path, "b", _state(2), keep_last=2)
    save_checkpoint(acc, tmp_path, "a", _state(5), keep_last=2)
    save_checkpoint(acc, tmp_path, "c", _state(6), keep_last=2)
    root = tmp_path / "checkpoints"
    assert json.loads((root / "index.json").read_text())["tags"] == ["a", "c"]
    assert load_checkpoint(root / "a", 0)[0]["round"] == 5
    assert not (root / "b").exists()


class _Payload:
    """Unpickling this would create a file: weights_only must refuse before running it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_load_refuses_pickled_objects(acc: Any, tmp_path: Path) -> None:
    path = save_checkpoint(acc, tmp_path, "evil", {"x": 1})
    marker = tmp_path / "code-ran"
    torch.save({"model": _Payload(marker)}, path / "state.pt")
    with pytest.raises(FerDistError, match=r"state\.pt: .*weights_only refused it: it pickles ") as info:
        load_checkpoint(path, 0)
    assert str(path / "state.pt") in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_corrupt_and_missing_files(acc: Any, tmp_path: Path) -> None:
    path = save_checkpoint(acc, tmp_path, "c", _state())
    data = (path / "state.pt").read_bytes()
    (path / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(FerDistError, match=r"state\.pt: not a loadable"):
        load_checkpoint(path, 0)
    (path / "rng-rank0.pt").write_bytes(b"garbage")
    (path / "state.pt").write_bytes(data)
    with pytest.raises(FerDistError, match=r"rng-rank0\.pt: not a loadable"):
        load_checkpoint(path, 0)
    with pytest.raises(FerDistError, match=r"nowhere/state\.pt: checkpoint file is missing"):
        load_checkpoint(tmp_path / "nowhere", 0)
    (tmp_path / "checkpoints" / "index.json").write_text("{not json")
    with pytest.raises(FerDistError, match=r"index\.json: not a readable checkpoint index"):
        latest_checkpoint(tmp_path)
    with pytest.raises(FerDistError, match=r"index\.json: not a readable checkpoint index"):
        save_checkpoint(acc, tmp_path, "d", _state())
    assert not (tmp_path / "checkpoints" / "d").exists()


def test_a_rank_without_rng_file_gets_none(
    acc: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = save_checkpoint(acc, tmp_path, "r", {"x": 1})
    with caplog.at_level(logging.WARNING, logger="fer_dist.checkpoint"):
        state, rng = load_checkpoint(path, 3)
    assert state == {"x": 1} and rng is None
    assert "no RNG state for rank 3" in caplog.text and "saved by 1 processes" in caplog.text


@pytest.mark.parametrize(
    ("bad", "entry"),
    [
        ({"config": {"run_dir": Path("runs/x")}}, "state['config']['run_dir'] is a pathlib"),
        ({"best_metric": np.float64(0.5)}, "state['best_metric'] is a numpy"),
        ({"history": [1, object()]}, "state['history'][1] is a builtins.object"),
        ({(1, 2): 3}, "state has a key of type tuple"),
        ({"bound": torch.float32.__class__}, "state['bound'] is a builtins.type"),
        ({"frozen": frozenset([1])}, "state['frozen'] is a builtins.frozenset"),
    ],
)
def test_save_refuses_what_weights_only_cannot_load(acc: Any, tmp_path: Path, bad: dict, entry: str) -> None:
    save_checkpoint(acc, tmp_path, "good", {"x": 1})
    with pytest.raises(FerDistError, match=entry.replace("[", r"\[").replace("]", r"\]")):
        save_checkpoint(acc, tmp_path, "bad", bad)
    root = tmp_path / "checkpoints"
    assert not (root / "bad").exists() and latest_checkpoint(tmp_path) == root / "good"


@pytest.mark.parametrize("tag", ["", ".hidden", "a/b", "latest", "best", "index.json", "../up"])
def test_bad_tags(acc: Any, tmp_path: Path, tag: str) -> None:
    with pytest.raises(FerDistError, match="checkpoint tag"):
        save_checkpoint(acc, tmp_path, tag, {"x": 1})


def test_keep_last_must_be_positive(acc: Any, tmp_path: Path) -> None:
    with pytest.raises(FerDistError, match="keep_last"):
        save_checkpoint(acc, tmp_path, "a", {"x": 1}, keep_last=0)


def test_two_process_save(tmp_path: Path) -> None:
    codes, reports = dist_worker.start("save", tmp_path).wait(120)
    assert codes == [0, 0], reports
    root = tmp_path / "run" / "checkpoints"
    for report in reports:
        assert report["num_processes"] == 2
        assert report["latest"] == str(root / "round-0003") == report["latest_after_bad"]
        assert report["replayed"] is True, "each rank's own RNG state came back"
        assert report["round"] == 3
    assert reports[0]["bad_state"].startswith("FerDistError: checkpoint: state['config']['run_dir']")
    assert reports[1]["bad_state"] == ("FerDistError: checkpoint: saving failed on another process "
                                       "(see its error)")
    expected = ["best", "index.json", "latest", "round-0002", "round-0003"]
    assert sorted(p.name for p in root.iterdir()) == expected
    for tag in ("round-0003", "best"):
        names = sorted(p.name for p in (root / tag).iterdir())
        assert names == ["meta.json", "rng-rank0.pt", "rng-rank1.pt", "state.pt"]
    assert read_meta(root / "round-0003")["world_size"] == 2
    assert read_meta(root / "best")["tag"] == "round-0001"
    rng0 = load_checkpoint(root / "round-0003", 0)[1]
    rng1 = load_checkpoint(root / "round-0003", 1)[1]
    assert not torch.equal(rng0["torch"], rng1["torch"]), "ranks were seeded differently"
    assert checkpoint.rng_file(1) == "rng-rank1.pt"
