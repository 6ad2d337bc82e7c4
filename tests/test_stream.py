"""Streams: pure plans, the allow-list, equal steps per rank, exhaustive coverage, resume, 2 real ranks."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from shard_fixtures import (
    fixture_include,
    fixture_label,
    fixture_targets,
    malicious_payload,
    pixel_value,
    synthetic_dir,
)
from train_fixtures import free_port

from fer_dist.data import plan
from fer_dist.data.augment import InputSpec, eval_transform, train_transform
from fer_dist.data.runset import ShardSet, checked_labels
from fer_dist.data.stream import (
    INLINE_BATCH,
    Loaders,
    exhaustive_loader,
    pack_batch,
    train_loader,
    unpack_batch,
)
from fer_dist.errors import FerDistError

SPEC = InputSpec(size=8, channels=1, mean=(0.0,), std=(1.0,))
UNEVEN = {"train": [5, 1, 9, 3, 13], "test": [4, 2]}  # 37 ids, deliberately uneven shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    synthetic_dir(out, UNEVEN)
    return out


@pytest.fixture(scope="module")
def shards(shard_dir):
    ss = ShardSet([(shard_dir, ["train", "test"])])
    return ss.shards(0)


def _loaders(shards, workers: int) -> Loaders:
    """A run's loaders over `shards` (persistent workers), as build_run makes them."""
    return Loaders(shards, num_workers=workers, train=train_transform(SPEC), exhaustive=eval_transform(SPEC))


def _check_images(images: torch.Tensor, ids: torch.Tensor) -> None:
    """Each image still carries its id's pixel value at the centre (augmentation keeps the centre inside)."""
    assert images.dtype == torch.uint8
    assert images[:, 0, 4, 4].tolist() == [pixel_value(int(i)) for i in ids]


# ---------------------------------------------------------------------------------------------------------
# the plans, directly


@pytest.mark.parametrize("n,gb,steps", [(1, 8, 1), (8, 8, 1), (9, 8, 2), (37, 6, 7), (0, 4, 0)])
def test_train_steps(n, gb, steps):
    assert plan.train_steps(n, gb) == steps


def _random_selection(seed: int, sizes: list[int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ranges, first = [], 0
    for n in sizes:
        ranges.append((first, n))
        first += n
    return plan.selected_ids(ranges, rng.random(first) < 0.7)


def _global_batches(selected, *, world, gb=12, seed=3, epoch=1, skip=0) -> list[list[int]]:
    """Each step's global batch: the ranks' slices, concatenated in rank order."""
    parts = [plan.train_batches(selected, global_batch=gb, world=world, rank=r, seed=seed, epoch=epoch,
                                skip=skip)[1] for r in range(world)]
    return [sum((p[s].tolist() for p in parts), []) for s in range(len(parts[0]))]


@pytest.mark.parametrize("sizes", [[5, 1, 9, 3, 13], [40], [2, 0, 3], [1000, 3, 250]])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_train_batches_equal_steps_cover_everything_and_repeat_from_the_start(sizes, world):
    selected = _random_selection(len(sizes), sizes)
    n, gb = selected.size, 12
    steps = plan.train_steps(n, gb)
    for rank in range(world):
        got_steps, ids = plan.train_batches(selected, global_batch=gb, world=world, rank=rank, seed=3,
                                            epoch=1)
        assert got_steps == steps and ids.shape == (steps, gb // world)
    flat = sum(_global_batches(selected, world=world), [])
    assert Counter(flat[:n]) == Counter(selected.tolist())  # each id once in the epoch's order ...
    assert flat[n:] == flat[:steps * gb - n] and steps * gb - n < gb  # ... then repeats from its start


@pytest.mark.parametrize("world", [2, 3, 4])
def test_the_global_batch_of_every_step_does_not_depend_on_the_world_size(world):
    selected = _random_selection(7, [40, 31, 9])
    assert _global_batches(selected, world=world) == _global_batches(selected, world=1)
    # and after a resume: the remaining global batches, on another number of processes
    assert _global_batches(selected, world=world, skip=2) == _global_batches(selected, world=1)[2:]


def test_the_epoch_order_depends_on_seed_epoch_and_the_selected_ids_only():
    selected = _random_selection(1, [3] * 12)
    assert _global_batches(selected, world=2) == _global_batches(selected.copy(), world=2)
    assert _global_batches(selected, world=2) != _global_batches(selected, world=2, epoch=2)
    assert _global_batches(selected, world=2) != _global_batches(selected, world=2, seed=4)


def test_sample_seeds_are_keyed_by_seed_epoch_and_id_alone():
    ids = np.array([5, 9, 5, 1000], dtype=np.int64)
    seeds = plan.sample_seeds(0, 3, ids)
    assert seeds[0] == seeds[2] and len(set(seeds.tolist())) == 3 and (seeds >= 0).all()
    assert plan.sample_seeds(0, 3, ids[::-1]).tolist() == seeds[::-1].tolist()  # not by position
    assert (plan.sample_seeds(0, 4, ids) != seeds).all() and (plan.sample_seeds(1, 3, ids) != seeds).all()


def test_train_batches_refuse_a_batch_that_does_not_split_over_ranks():
    with pytest.raises(FerDistError, match="multiple of world size 4"):
        plan.train_batches(_random_selection(0, [9]), global_batch=6, world=4, rank=0, seed=0, epoch=0)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_exhaustive_batches_read_each_sample_once(world):
    selected = _random_selection(4, [5, 1, 9, 3, 13])
    seen, per_rank = Counter(), []
    for rank in range(world):
        batches = plan.exhaustive_batches(selected, batch_size=4, world=world, rank=rank)
        assert all(1 <= b.size <= 4 for b in batches)
        per_rank.append(sum(b.size for b in batches))
        seen.update(i for b in batches for i in b.tolist())
    assert sorted(seen.elements()) == sorted(selected.tolist())
    assert max(per_rank) - min(per_rank) <= 1


# ---------------------------------------------------------------------------------------------------------
# shard sets, labels, the allow-list


def test_shardset_offsets_directories_in_the_order_given(tmp_path):
    synthetic_dir(tmp_path / "a", {"train": [3, 4], "test": [2]})
    synthetic_dir(tmp_path / "b", {"train": [5]})
    ss = ShardSet([(tmp_path / "b", ["train"]), (tmp_path / "a", ["train"]), (tmp_path / "a", ["test"])])
    assert ss.num_ids == 5 + 9
    assert [s.first_run_id for s in ss.shards(0)] == [0]
    assert [s.first_run_id for s in ss.shards(1)] == [5, 8]
    assert [s.first_run_id for s in ss.shards(2)] == [12]
    assert [o["offset"] for o in ss.offsets] == [0, 5]
    assert ShardSet([(tmp_path / "b", ["train"]), (tmp_path / "a", ["test"])]).offsets == ss.offsets
    with pytest.raises(FerDistError, match="no split 'val'"):
        ShardSet([(tmp_path / "a", ["val"])]).shards(0)
    with pytest.raises(FerDistError, match="no manifest"):
        ShardSet([(tmp_path, ["train"])])


def test_the_label_pass_reads_named_splits_only(tmp_path):
    synthetic_dir(tmp_path / "a", {"train": [3, 4], "test": [2]})
    synthetic_dir(tmp_path / "b", {"train": [5]})
    ss = ShardSet([(tmp_path / "a", ["train"]), (tmp_path / "b", ["train"])])
    labels = checked_labels(ss).labels
    want = [fixture_label(i) for i in range(7)] + [-1, -1] + [fixture_label(i) for i in range(5)]
    assert labels.tolist() == want


def _edit_sample_2(data: bytearray, members: dict[str, tarfile.TarInfo], where: str) -> None:
    cls, json_, png = (members[f"00000002.{ext}"] for ext in ("cls", "json", "png"))
    if where == "cls":  # another valid class: only the digest can tell
        data[cls.offset_data] = ord("5") if data[cls.offset_data] != ord("5") else ord("4")
    elif where == "json":
        data[json_.offset_data + json_.size // 2] ^= 0x01
    elif where == "padding":  # tarfile never reads it
        assert json_.size % tarfile.BLOCKSIZE
        data[json_.offset_data + json_.size] = 0x20
    elif where == "png":
        data[png.offset_data + png.size - 1] ^= 0x01
    else:  # a header changed with its checksum made good again: tarfile takes it
        header = tarfile.TarInfo.frombuf(bytes(data[png.offset:png.offset_data]), "utf-8", "strict")
        header.mtime = 12345
        data[png.offset:png.offset_data] = header.tobuf(tarfile.USTAR_FORMAT)


@pytest.mark.parametrize("where", ["cls", "json", "padding", "png", "header"])
def test_the_label_pass_checks_every_byte_of_a_sample_as_it_lies_in_the_shard(tmp_path, where):
    synthetic_dir(tmp_path / "a", {"train": [4, 3]})
    tar = tmp_path / "a" / "train-000000.tar"
    with tarfile.open(tar) as t:
        members = {m.name: m for m in t.getmembers()}
    data = bytearray(tar.read_bytes())
    _edit_sample_2(data, members, where)
    tar.write_bytes(bytes(data))
    ss = ShardSet([(tmp_path / "a", ["train"])])
    with pytest.raises(FerDistError, match=r"train-000000\.tar: sample 00000002 differs from the manifest's "
                                           r"digest \(damaged after sharding\)$"):
        checked_labels(ss)
    found = checked_labels(ss, on_error="skip")
    assert found.damaged.nonzero().flatten().tolist() == [2] and len(found.problems) == 1
    assert found.labels.tolist() == [fixture_label(i) if i != 2 else -1 for i in range(7)]


def test_a_member_outside_the_allow_list_is_refused_and_never_unpickled(tmp_path):
    marker, probe = tmp_path / "unpickled", tmp_path / "probe"
    pickle.loads(malicious_payload(probe))  # the payload is really malicious: unpickling creates a file
    assert probe.exists()
    synthetic_dir(tmp_path / "bad", {"train": [4, 6]}, extra={7: {"pyd": malicious_payload(marker)}})
    ss = ShardSet([(tmp_path / "bad", ["train"])])
    targets = fixture_targets(ss.num_ids)
    include = torch.ones(ss.num_ids, dtype=torch.bool)
    with pytest.raises(FerDistError, match=r"train-000001\.tar: sample '00000007'.*00000007\.pyd"):
        checked_labels(ss)
    with pytest.raises(FerDistError, match=r"train-000001\.tar: sample '00000007'") as err:
        list(train_loader(ss.shards(0), include, targets, transform=train_transform(SPEC), global_batch=2,
                          rank=0, world=1, num_workers=2, seed=0, epoch=0))
    assert "\n" not in str(err.value)
    with pytest.raises(FerDistError, match=r"train-000001\.tar: sample '00000007'"):
        Loaders(ss.shards(0), num_workers=0, exhaustive=eval_transform(SPEC))  # a run's, made at its start
    assert not marker.exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_png_member_that_is_not_a_png_is_refused_in_one_line(tmp_path, workers):
    out = tmp_path / "jpeg"
    synthetic_dir(out, {"train": [3]})
    manifest = json.loads((out / "manifest.json").read_text())
    tar = out / manifest["splits"]["train"]["shards"][0]["file"]
    data = bytearray(tar.read_bytes())
    at = data.index(b"\x89PNG")
    data[at:at + 4] = b"\xff\xd8\xff\xe0"  # a JPEG signature: cv2 would decode it, the allow-list must not
    tar.write_bytes(bytes(data))
    with pytest.raises(FerDistError, match="sample 00000000 has no PNG image") as err:  # found by a worker
        list(exhaustive_loader(ShardSet([(out, ["train"])]).shards(0), None, transform=eval_transform(SPEC),
                               batch_size=2, rank=0, world=1, num_workers=workers))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# the training stream


def _epoch(shards, *, world, rank, workers, seed=0, epoch=0, skip=0, gb=6, loaders=None):
    """An epoch on `loaders` (a run's, kept) where given, else on a one-pass loader with `workers`."""
    n = shards[-1].first_run_id + shards[-1].count
    plan = {"global_batch": gb, "rank": rank, "world": world, "seed": seed, "epoch": epoch,
            "skip_batches": skip}
    if loaders is not None:
        return loaders.train(shards, fixture_include(n), fixture_targets(n), **plan)
    return train_loader(shards, fixture_include(n), fixture_targets(n), transform=train_transform(SPEC),
                        num_workers=workers, **plan)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 1), (3, 2)])
def test_train_stream_equal_steps_full_batches_and_coverage(shards, world, workers):
    n = shards[-1].first_run_id + shards[-1].count
    include, targets = fixture_include(n), fixture_targets(n)
    seen, counts = set(), []
    for rank in range(world):
        stream = _epoch(shards, world=world, rank=rank, workers=workers)
        batches = list(stream)
        counts.append(len(batches))
        for images, tgt, ids in batches:
            assert images.shape == (6 // world, 1, 8, 8) and ids.shape == (6 // world,)
            assert torch.equal(tgt, targets[ids])
            assert include[ids].all()
            _check_images(images, ids)
            seen.update(ids.tolist())
    assert counts == [stream.steps] * world == [-(-int(include.sum()) // 6)] * world
    assert seen == set(torch.nonzero(include).flatten().tolist())


def _global_epoch(shards, *, world, workers, skip=0, gb=6, loaders=None) -> list[dict[int, torch.Tensor]]:
    """Per step of the epoch: each id of the global batch and its augmented image, over all ranks."""
    out: list[dict[int, torch.Tensor]] = []
    for rank in range(world):
        for s, (images, _, ids) in enumerate(_epoch(shards, world=world, rank=rank, workers=workers, seed=5,
                                                    epoch=3, skip=skip, gb=gb, loaders=loaders)):
            if rank == 0:
                out.append({})
            out[s].update(zip(ids.tolist(), images, strict=True))
    return out


@pytest.mark.parametrize("world,workers", [(2, 0), (3, 2), (6, 1)])
def test_each_global_batch_is_the_same_samples_and_images_on_any_world_and_workers(shards, world, workers):
    """Elastic determinism: step s trains the same ids, augmented alike, on 1 process or `world` (each
    rank's pass read by the same kept loader, as a run's epochs are)."""
    one = _global_epoch(shards, world=1, workers=0)
    with _loaders(shards, workers) as loaders:
        many = _global_epoch(shards, world=world, workers=workers, loaders=loaders)
    assert [sorted(b) for b in many] == [sorted(b) for b in one]
    assert all(torch.equal(b[i], a[i]) for a, b in zip(one, many, strict=True) for i in a)
    augmented = [img for b in one for img in b.values()]
    assert any(not torch.equal(img, augmented[0]) for img in augmented[1:]), "no augmentation: a check"


def test_train_stream_is_deterministic_and_reshuffles_each_epoch(shards):
    first = list(_epoch(shards, world=2, rank=1, workers=2, seed=5, epoch=3))
    again = list(_epoch(shards, world=2, rank=1, workers=2, seed=5, epoch=3))
    later = list(_epoch(shards, world=2, rank=1, workers=2, seed=5, epoch=4))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(first, again, strict=True))
    assert [b[2].tolist() for b in first] != [b[2].tolist() for b in later]


@pytest.mark.parametrize("workers,skip", [(0, 3), (2, 3), (2, 4)])
def test_skip_batches_resumes_exactly_where_the_epoch_stopped(shards, workers, skip):
    full = list(_epoch(shards, world=1, rank=0, workers=workers, seed=9, epoch=2, gb=4))
    with _loaders(shards, workers) as loaders:  # the resumed run's own loaders
        resumed = _epoch(shards, world=1, rank=0, workers=workers, seed=9, epoch=2, gb=4, skip=skip,
                         loaders=loaders)
        assert resumed.steps == len(full) and len(resumed) == len(full) - skip
        rest = list(resumed)
    assert len(rest) == len(full) - skip
    for a, b in zip(full[skip:], rest, strict=True):
        assert torch.equal(a[2], b[2]) and torch.equal(a[1], b[1])
        assert torch.equal(a[0], b[0])  # same augmentations, bit for bit


def test_a_resume_on_another_world_size_continues_with_the_same_global_batches(shards):
    full = _global_epoch(shards, world=1, workers=0)
    for world, skip in ((2, 2), (3, 4)):
        rest = _global_epoch(shards, world=world, workers=1, skip=skip)
        assert [sorted(b) for b in rest] == [sorted(b) for b in full[skip:]]
        assert all(torch.equal(b[i], a[i]) for a, b in zip(full[skip:], rest, strict=True) for i in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_stream_leaves_the_trainers_generator_alone(shards, workers):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    list(_epoch(shards, world=1, rank=0, workers=workers))
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------------------
# the exhaustive pass


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_exhaustive_covers_each_selected_id_once(shards, world, workers):
    n = shards[-1].first_run_id + shards[-1].count
    include = fixture_include(n)
    seen = Counter()
    with _loaders(shards, workers) as loaders:
        for rank in range(world):
            for images, labels, ids in loaders.exhaustive(shards, include, batch_size=4, rank=rank,
                                                          world=world):
                assert 1 <= len(ids) <= 4
                assert labels.tolist() == [fixture_label(int(i)) for i in ids]
                _check_images(images, ids)
                seen.update(ids.tolist())
    assert sorted(seen.elements()) == torch.nonzero(include).flatten().tolist()


def test_exhaustive_without_mask_reads_everything_in_rgb(tmp_path):
    synthetic_dir(tmp_path / "rgb", {"train": [3, 2]}, channels=3)
    shards = ShardSet([(tmp_path / "rgb", ["train"])]).shards(0)
    spec = InputSpec(size=8, channels=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    batches = list(exhaustive_loader(shards, None, transform=eval_transform(spec), batch_size=8, rank=0,
                                     world=1, num_workers=0))
    images, _, ids = batches[0]
    assert ids.tolist() == [0, 1, 2, 3, 4]
    v = torch.tensor([pixel_value(i) for i in range(5)], dtype=torch.uint8)
    assert torch.equal(images[:, :, 4, 4], torch.stack([v, v // 2, 255 - v], 1))


# ---------------------------------------------------------------------------------------------------------
# two real processes


def test_two_real_ranks_take_equal_steps(shard_dir, tmp_path):
    out = tmp_path / "result.json"
    worker = Path(__file__).with_name("dist_stream_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(worker), str(shard_dir), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    n = 37
    selected = set(torch.nonzero(fixture_include(n)).flatten().tolist())
    train, exhaustive = result["train"], result["exhaustive"]
    assert train["counts"][0] == train["counts"][1] == train["steps"] == -(-len(selected) // 6)
    assert all(size == 3 for rank in train["sizes"] for size in rank)
    assert set().union(*map(set, train["ids"])) == selected  # repeats only to fill the last batch
    assert sorted(exhaustive["ids"][0] + exhaustive["ids"][1]) == sorted(selected)
    assert result["global"] == result["one_process"]  # step s: the same samples on 2 ranks as on 1
    assert train["targets_match"] and train["images_match"]
    assert exhaustive["labels_match"] and exhaustive["images_match"]


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_loader_workers_survive_stop_signals_sent_to_every_process(shards, signame, capfd):
    """SLURM signals every process of a job; the stop is the trainer's to handle, never the death of a
    worker, the fork server or multiprocessing's resource tracker (SIGUSR1's default action ends them)."""
    import contextlib
    import signal
    import threading
    import time

    import psutil

    from fer_dist.stopsignals import StopRequest

    n = sum(s.count for s in shards)
    include = torch.ones(n, dtype=torch.bool)
    targets = torch.zeros(n, 7)
    stop, done = StopRequest(), threading.Event()

    def pester() -> None:  # the signal to this process and all its children, over and over, forks included
        me = psutil.Process()
        while not done.is_set():
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(getattr(signal, signame))
            time.sleep(0.002)

    thread = threading.Thread(target=pester, daemon=True)
    thread.start()
    plan = {"global_batch": 4, "rank": 0, "world": 1, "seed": 0}
    try:
        for epoch in range(2):  # one-pass loaders: new workers each epoch, started while the signals come
            stream = train_loader(shards, include, targets, transform=eval_transform(SPEC), num_workers=2,
                                  epoch=epoch, **plan)
            assert sum(1 for _ in stream) == stream.steps
            if epoch == 0:
                helpers = {c.pid for c in psutil.Process().children()}  # the tracker and the fork server
        with _loaders(shards, 2) as loaders:  # then a run's: started once, kept for the later epochs
            for epoch in range(2, 4):
                stream = loaders.train(shards, include, targets, epoch=epoch, **plan)
                assert sum(1 for _ in stream) == stream.steps
    finally:
        done.set()
        thread.join()
        stop.close()
    assert stop.requested
    alive = {c.pid for c in psutil.Process().children() if c.status() != psutil.STATUS_ZOMBIE}
    assert len(helpers) == 2 and helpers <= alive, "the tracker or the fork server was killed"
    # a tracker killed and started again prints a KeyError for each semaphore its predecessor registered
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("n, side", [(4, 8), (16, 48), (INLINE_BATCH // (3 * 48 * 48) + 1, 48)])
def test_batches_travel_packed_and_arrive_whole(n, side):
    """Small uint8 batches leave a worker as bytes, large ones as a tensor; both arrive as the same batch."""
    faces = [torch.randint(0, 256, (3, side, side), dtype=torch.uint8) for _ in range(n)]
    packed = pack_batch(faces)
    assert isinstance(packed, torch.Tensor) == (n * 3 * side * side > INLINE_BATCH)
    arrived = unpack_batch(pickle.loads(pickle.dumps(packed)))
    assert torch.equal(arrived, torch.stack(faces))
    floats = [f.float() for f in faces]  # anything but uint8 goes as a tensor
    assert torch.equal(unpack_batch(pack_batch(floats)), torch.stack(floats))


def _worker_pids() -> set[int]:
    """This process's loader workers, still running: its grandchildren (their parent is the fork server)."""
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)
            if p.ppid() != os.getpid() and p.status() != psutil.STATUS_ZOMBIE}


def _until(condition, seconds: float = 30) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_a_runs_workers_come_from_the_fork_server_are_kept_from_pass_to_pass_and_end_with_close(shards):
    """Forking the multi-threaded trainer can deadlock the child (CPython gh-112275): workers must not be
    this process's direct children. A run's loaders start once per kind of stream (train, exhaustive), the
    same workers read every later pass of their kind, and close() ends them; a one-pass loader's end with
    its pass."""
    import psutil

    n = sum(s.count for s in shards)
    everything = torch.ones(n, dtype=torch.bool)
    list(train_loader(shards, everything, torch.zeros(n, 7), transform=eval_transform(SPEC), num_workers=2,
                      global_batch=4, rank=0, world=1, seed=0, epoch=0))
    assert _until(lambda: not _worker_pids()), "a one-pass loader's workers outlived its pass"
    seen = []
    with _loaders(shards, 2) as loaders:
        for epoch in range(3):
            batches = iter(loaders.train(shards, everything, torch.zeros(n, 7), global_batch=4, rank=0,
                                         world=1, seed=0, epoch=epoch))
            next(batches)
            seen.append(_worker_pids())
            list(batches)
            passes = iter(loaders.exhaustive(shards[1:], None, batch_size=4, rank=0, world=1))
            next(passes)
            seen.append(_worker_pids())
            list(passes)
        train, both = seen[0], seen[1]
        assert len(train) == 2 and len(both) == 4 and train < both  # two of each kind
        assert all(pids == both for pids in seen[1:])  # the very same workers ever after
        server = {c.pid for c in psutil.Process().children()}  # the fork server among this process's children
        assert len({psutil.Process(p).ppid() for p in both} & server) == 1
        with pytest.raises(FerDistError, match="not made for"):
            _epoch(shards, world=1, rank=0, workers=2, loaders=Loaders(shards[:1], num_workers=0,
                                                                       exhaustive=eval_transform(SPEC)))
    assert _until(lambda: not _worker_pids())


@pytest.mark.parametrize("stop_after", [1, 3])
def test_one_pass_at_a_time_and_one_left_unfinished_leaves_no_trace_in_the_next(shards, stop_after):
    """A DataLoader has one iterator: a second pass while one is suspended is refused, not mixed with it.
    Once the unfinished pass is closed, the batches it left in flight must not reach the next pass, which
    reads exactly what it reads on new workers."""
    expected = list(_epoch(shards, world=1, rank=0, workers=2, seed=3, epoch=1))
    with _loaders(shards, 2) as loaders:
        first = iter(_epoch(shards, world=1, rank=0, workers=2, seed=3, epoch=0, loaders=loaders))
        for _ in range(stop_after):
            next(first)
        workers = _worker_pids()
        with pytest.raises(RuntimeError, match="still being read"):
            list(_epoch(shards, world=1, rank=0, workers=2, seed=3, epoch=1, loaders=loaders))
        first.close()  # generator closed mid-epoch, as when train_epoch raises StopRun
        again = list(_epoch(shards, world=1, rank=0, workers=2, seed=3, epoch=1, loaders=loaders))
        assert len(workers) == 2 and _worker_pids() == workers  # the same workers
    assert len(again) == len(expected)
    for a, b in zip(expected, again, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


@pytest.mark.timeout(60)  # the failure this guards against is a hang
def test_a_transform_that_cannot_reach_the_workers_fails_at_once(shards):
    """A transform that does not pickle (a lambda) must fail in the caller as workers start, not hang."""
    n = shards[-1].first_run_id + shards[-1].count
    with pytest.raises((AttributeError, pickle.PicklingError), match="lambda|local"):
        list(train_loader(shards, fixture_include(n), fixture_targets(n), transform=lambda image: image,
                          global_batch=6, rank=0, world=1, num_workers=2, seed=3, epoch=1))


@pytest.mark.timeout(60)  # the failure this guards against is a hang
def test_a_worker_killed_between_passes_fails_the_next_one_at_once(shards):
    """A kept worker that died while idle (the OOM killer's pick) ends the next pass with DataLoader's
    error, as one dying mid-pass does: the run stops (and resumes from its checkpoint), it does not hang."""
    import signal

    import psutil

    with _loaders(shards, 2) as loaders:
        list(_epoch(shards, world=1, rank=0, workers=2, seed=3, epoch=0, loaders=loaders))
        victim = min(_worker_pids())
        os.kill(victim, signal.SIGKILL)
        assert _until(lambda: not psutil.pid_exists(victim) or psutil.Process(victim).status() ==
                      psutil.STATUS_ZOMBIE)
        with pytest.raises(RuntimeError, match="exited unexpectedly"):
            list(_epoch(shards, world=1, rank=0, workers=2, seed=3, epoch=1, loaders=loaders))


_TRAINER = """
import json, os, signal, sys
import psutil, torch
from fer_dist.data.augment import InputSpec, eval_transform
from fer_dist.data.runset import ShardSet
from fer_dist.data.stream import Loaders

def main(how):
    shards = ShardSet([(sys.argv[1], ["train"])]).shards(0)
    n = shards[-1].first_run_id + shards[-1].count
    loaders = Loaders(shards, num_workers=2, train=eval_transform(InputSpec(8, 1, (0.0,), (1.0,))))
    try:
        for _ in loaders.train(shards, torch.ones(n, dtype=torch.bool), torch.zeros(n, 7), global_batch=2,
                               rank=0, world=1, seed=0, epoch=0):  # a pass held: the workers stay up
            print(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)
            if how == "killed":  # a trainer killed outright: no clean-up runs
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("the step failed")  # an error mid-epoch, its traceback holding the pass
    finally:
        loaders.close()  # as train.main's finally

if __name__ == "__main__":
    main(sys.argv[2])
"""


@pytest.mark.parametrize("how, code", [("killed", -9), ("failed", 1)])
def test_a_trainer_killed_or_failed_mid_pass_leaves_no_workers_behind(shard_dir, tmp_path, how, code):
    """The fork server and its workers go when the process that started them dies; a pass an error left
    suspended is ended by close(), else the process would hang at exit (multiprocessing waits for workers
    that ignore its SIGTERM)."""
    import json
    import subprocess
    import sys

    import psutil

    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER)
    done = subprocess.run([sys.executable, str(script), str(shard_dir), how], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == code, done.stderr
    left = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(left) >= 3  # the fork server, two workers (their parent) and the resource tracker

    def gone() -> bool:
        return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                       for p in left)

    assert _until(gone), [psutil.Process(p).cmdline()[-1][:80] for p in left if psutil.pid_exists(p)]
