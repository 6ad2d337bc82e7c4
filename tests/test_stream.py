"""Streams: pure plans, the allow-list, equal steps per rank, exhaustive coverage, resume, 2 real ranks."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
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

from fer_dist.data import plan
from fer_dist.data.augment import InputSpec, eval_transform, train_transform
from fer_dist.data.shardread import index_key
from fer_dist.data.stream import (
    INLINE_BATCH,
    ShardSet,
    close_loader_workers,
    exhaustive_loader,
    pack_batch,
    read_labels,
    train_loader,
    unpack_batch,
)
from fer_dist.errors import FerDistError

SPEC = InputSpec(size=8, channels=1, mean=(0.0,), std=(1.0,))
UNEVEN = {"train": [5, 1, 9, 3, 13], "test": [4, 2]}  # 37 ids, deliberately uneven shards


@pytest.fixture(autouse=True)
def _no_workers_left():
    """Each test starts and ends without loader workers kept from another test."""
    close_loader_workers()
    yield
    close_loader_workers()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    synthetic_dir(out, UNEVEN)
    return out


@pytest.fixture(scope="module")
def shards(shard_dir):
    ss = ShardSet([(shard_dir, ["train", "test"])])
    return ss.shards(0)


def _check_images(images: torch.Tensor, ids: torch.Tensor) -> None:
    """Each image still carries its id's pixel value at the centre (augmentation keeps the centre inside)."""
    assert images.dtype == torch.uint8
    assert images[:, 0, 4, 4].tolist() == [pixel_value(int(i)) for i in ids]


# ---------------------------------------------------------------------------------------------------------
# the plans, directly


@pytest.mark.parametrize("steps,workers", [(0, 1), (1, 3), (7, 2), (7, 3), (9, 3), (10, 4)])
def test_worker_quotas_follow_round_robin(steps, workers):
    quotas = plan.worker_quotas(steps, workers)
    assert sum(quotas) == steps
    assert quotas == [sum(1 for j in range(steps) if j % workers == w) for w in range(workers)]


@pytest.mark.parametrize("n,gb,steps", [(1, 8, 1), (8, 8, 1), (9, 8, 2), (37, 6, 7), (0, 4, 0)])
def test_train_steps(n, gb, steps):
    assert plan.train_steps(n, gb) == steps


def _random_selection(seed: int, sizes: list[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ranges, first = [], 0
    for n in sizes:
        ranges.append((first, n))
        first += n
    return plan.selected_ids(ranges, rng.random(first) < 0.7)


@pytest.mark.parametrize("sizes", [[5, 1, 9, 3, 13], [40], [2, 0, 3], [1000, 3, 250]])
@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 1), (4, 3)])
def test_train_plan_balances_selected_counts_and_covers_everything(sizes, world, workers):
    selected = _random_selection(len(sizes), sizes)
    n, gb = sum(s.size for s in selected), 6 * world
    seen: Counter = Counter()
    for rank in range(world):
        steps, slots = plan.train_plan(selected, global_batch=gb, world=world, rank=rank, workers=workers,
                                       seed=3, epoch=1)
        assert steps == -(-n // gb)
        assert sum(s.batches for s in slots) == steps
        for slot in slots:  # every slot holds exactly its quota of samples: balance by selected count
            assert slot.samples == slot.batches * (gb // world)
            for piece in slot.pieces:
                assert set(piece.ids.tolist()) <= set(selected[piece.shard].tolist())
                seen.update(piece.ids.tolist())
    assert set(seen) == {int(i) for s in selected for i in s}
    assert sum(seen.values()) - n == steps * gb - n < gb  # repeats only to fill the last global batch


def test_train_plan_cuts_shards_when_they_are_fewer_than_slots():
    selected = _random_selection(0, [11])  # one shard, 2 ranks x 3 workers
    for rank in range(2):
        _, slots = plan.train_plan(selected, global_batch=4, world=2, rank=rank, workers=3, seed=0, epoch=0)
        assert all(s.samples == s.batches * 2 for s in slots)
        assert any(s.samples for s in slots)


def test_train_plan_depends_on_seed_and_epoch_only():
    selected = _random_selection(1, [3] * 12)
    kw = {"global_batch": 4, "world": 2, "rank": 1, "workers": 2}

    def ids(seed, epoch):
        slots = plan.train_plan(selected, seed=seed, epoch=epoch, **kw)[1]
        return [p.ids.tolist() for s in slots for p in s.pieces]

    assert ids(0, 0) == ids(0, 0)
    assert ids(0, 0) != ids(0, 1)
    assert ids(0, 0) != ids(1, 0)


@pytest.mark.parametrize("workers,skip", [(0, 2), (2, 3), (3, 4), (3, 6)])
def test_train_plan_resume_continues_the_round_robin(workers, skip):
    selected = _random_selection(2, [7, 7, 7])
    kw = {"global_batch": 2, "world": 1, "rank": 0, "workers": workers, "seed": 0, "epoch": 0}
    steps, full = plan.train_plan(selected, **kw)
    _, resumed = plan.train_plan(selected, skip=skip, **kw)
    roles = max(1, workers)

    def order(slots):  # (role, batch index of the role) in the order a DataLoader hands batches out
        left = [list(range(s.skip, s.skip + s.batches)) for s in slots]
        out = []
        while any(left):
            out += [(slots[i].role, left[i].pop(0)) for i in range(roles) if left[i]]
        return out

    assert order(resumed) == order(full)[skip:]
    def pieces(slot):
        return [(p.shard, p.ids.tolist()) for p in slot.pieces]

    assert [pieces(full[s.role]) for s in resumed] == [pieces(s) for s in resumed]


def test_train_plan_refuses_a_batch_that_does_not_split_over_ranks():
    with pytest.raises(FerDistError, match="multiple of world size 4"):
        plan.train_plan(_random_selection(0, [9]), global_batch=6, world=4, rank=0, workers=0, seed=0,
                        epoch=0)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("workers", [0, 1, 2, 4])
def test_exhaustive_plan_reads_each_sample_once(world, workers):
    selected = _random_selection(4, [5, 1, 9, 3, 13])
    seen, per_rank = Counter(), []
    for rank in range(world):
        slots = plan.exhaustive_plan(selected, batch_size=4, world=world, rank=rank, workers=workers)
        per_rank.append(sum(s.samples for s in slots))
        seen.update(i for s in slots for p in s.pieces for i in p.ids.tolist())
    assert sorted(seen.elements()) == sorted(int(i) for s in selected for i in s)
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


def test_read_labels_reads_named_splits_only(tmp_path):
    synthetic_dir(tmp_path / "a", {"train": [3, 4], "test": [2]})
    synthetic_dir(tmp_path / "b", {"train": [5]})
    ss = ShardSet([(tmp_path / "a", ["train"]), (tmp_path / "b", ["train"])])
    labels = read_labels(ss)
    want = [fixture_label(i) for i in range(7)] + [-1, -1] + [fixture_label(i) for i in range(5)]
    assert labels.tolist() == want


def test_a_member_outside_the_allow_list_is_refused_and_never_unpickled(tmp_path):
    marker, probe = tmp_path / "unpickled", tmp_path / "probe"
    pickle.loads(malicious_payload(probe))  # the payload is really malicious: unpickling creates a file
    assert probe.exists()
    synthetic_dir(tmp_path / "bad", {"train": [4, 6]}, extra={7: {"pyd": malicious_payload(marker)}})
    ss = ShardSet([(tmp_path / "bad", ["train"])])
    targets = fixture_targets(ss.num_ids)
    include = torch.ones(ss.num_ids, dtype=torch.bool)
    with pytest.raises(FerDistError, match=r"train-000001\.tar: sample '00000007'.*00000007\.pyd"):
        read_labels(ss)
    for workers in (0, 2):
        stream = train_loader(ss.shards(0), include, targets, transform=train_transform(SPEC), global_batch=2,
                              rank=0, world=1, num_workers=workers, seed=0, epoch=0)
        with pytest.raises(FerDistError, match=r"train-000001\.tar: sample '00000007'") as err:
            list(stream)
        assert "\n" not in str(err.value)
        with pytest.raises(FerDistError, match=r"train-000001\.tar: sample '00000007'"):
            list(exhaustive_loader(ss.shards(0), None, transform=eval_transform(SPEC), batch_size=3, rank=0,
                                   world=1, num_workers=workers))
    assert not marker.exists()


def test_a_png_member_that_is_not_a_png_is_refused(tmp_path):
    out = tmp_path / "jpeg"
    synthetic_dir(out, {"train": [3]})
    manifest = json.loads((out / "manifest.json").read_text())
    tar = out / manifest["splits"]["train"]["shards"][0]["file"]
    data = bytearray(tar.read_bytes())
    at = data.index(b"\x89PNG")
    data[at:at + 4] = b"\xff\xd8\xff\xe0"  # a JPEG signature: cv2 would decode it, the allow-list must not
    tar.write_bytes(bytes(data))
    with pytest.raises(FerDistError, match="sample 00000000 has no PNG image"):
        list(exhaustive_loader(ShardSet([(out, ["train"])]).shards(0), None, transform=eval_transform(SPEC),
                               batch_size=2, rank=0, world=1, num_workers=0))


# ---------------------------------------------------------------------------------------------------------
# the training stream


def _epoch(shards, *, world, rank, workers, seed=0, epoch=0, skip=0, gb=6):
    n = shards[-1].first_run_id + shards[-1].count
    return train_loader(shards, fixture_include(n), fixture_targets(n), transform=train_transform(SPEC),
                        global_batch=gb, rank=rank, world=world, num_workers=workers, seed=seed, epoch=epoch,
                        skip_batches=skip)


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


def test_train_stream_is_deterministic_and_reshuffles_each_epoch(shards):
    first = list(_epoch(shards, world=2, rank=1, workers=2, seed=5, epoch=3))
    again = list(_epoch(shards, world=2, rank=1, workers=2, seed=5, epoch=3))
    later = list(_epoch(shards, world=2, rank=1, workers=2, seed=5, epoch=4))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(first, again, strict=True))
    assert [b[2].tolist() for b in first] != [b[2].tolist() for b in later]


@pytest.mark.parametrize("workers,skip", [(0, 3), (2, 3), (2, 4)])
def test_skip_batches_resumes_exactly_where_the_epoch_stopped(shards, workers, skip):
    full = list(_epoch(shards, world=1, rank=0, workers=workers, seed=9, epoch=2, gb=4))
    resumed = _epoch(shards, world=1, rank=0, workers=workers, seed=9, epoch=2, gb=4, skip=skip)
    assert resumed.steps == len(full) and len(resumed) == len(full) - skip
    rest = list(resumed)
    assert len(rest) == len(full) - skip
    for a, b in zip(full[skip:], rest, strict=True):
        assert torch.equal(a[2], b[2]) and torch.equal(a[1], b[1])
        assert torch.equal(a[0], b[0])  # same augmentations, bit for bit


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
    for rank in range(world):
        stream = exhaustive_loader(shards, include, transform=eval_transform(SPEC), batch_size=4, rank=rank,
                                   world=world, num_workers=workers)
        for images, labels, ids in stream:
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_real_ranks_take_equal_steps(shard_dir, tmp_path):
    out = tmp_path / "result.json"
    worker = Path(__file__).with_name("dist_stream_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
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
    assert train["targets_match"] and train["images_match"]
    assert exhaustive["labels_match"] and exhaustive["images_match"]


def test_a_workers_part_and_its_indexes_survive_pickling(shards):
    """A worker is sent its part of the stream and the shard indexes pickled: both must arrive whole."""
    stream = _epoch(shards, world=2, rank=0, workers=0, seed=4)
    indexes = stream._dataset.load_indexes()  # as the main process does before sending the parts
    part, sent = pickle.loads(pickle.dumps((stream._dataset.part(0), list(indexes.values()))))
    assert sent and [index_key(i) for i in sent] == [index_key(i) for i in indexes.values()]
    for a, b in zip(sent, indexes.values(), strict=True):
        assert all(np.array_equal(a.at[f], b.at[f]) and np.array_equal(a.size[f], b.size[f]) for f in a.at)
    for (a_img, a_ids), (b_img, b_ids) in zip(stream._dataset.part(0), part, strict=True):
        assert a_ids == b_ids and torch.equal(unpack_batch(a_img), unpack_batch(b_img))


def test_loader_workers_survive_stop_signals_sent_to_every_process(shards):
    """SLURM signals every process of a job; the stop is the trainer's to handle, never a worker's death."""
    import contextlib
    import signal
    import threading
    import time

    import psutil

    from fer_dist.dist import StopRequest

    n = sum(s.count for s in shards)
    include = torch.ones(n, dtype=torch.bool)
    targets = torch.zeros(n, 7)
    stop, done = StopRequest(), threading.Event()

    def pester() -> None:  # SIGTERM to this process and all its children, over and over, forks included
        me = psutil.Process()
        while not done.is_set():
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signal.SIGTERM)
            time.sleep(0.002)

    thread = threading.Thread(target=pester, daemon=True)
    thread.start()
    try:
        for epoch in range(4):  # epochs on new workers (started while the signals keep coming), then kept
            stream = train_loader(shards, include, targets, transform=eval_transform(SPEC), global_batch=4,
                                  rank=0, world=1, num_workers=2, seed=0, epoch=epoch)
            assert sum(1 for _ in stream) == stream.steps
            if epoch < 2:
                close_loader_workers()
    finally:
        done.set()
        thread.join()
        stop.close()
    assert stop.requested


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
    """This process's loader workers: its grandchildren (their parent is the fork server)."""
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True) if p.ppid() != os.getpid()}


def test_workers_come_from_the_fork_server_and_are_kept_from_epoch_to_epoch(shards):
    """Forking the multi-threaded trainer can deadlock the child (CPython gh-112275): workers must not be
    this process's direct children. Started once, the same workers read every later epoch and stream."""
    import psutil

    n = sum(s.count for s in shards)
    everything = torch.ones(n, dtype=torch.bool)
    seen = []
    for epoch in range(3):
        stream = train_loader(shards, everything, torch.zeros(n, 7), transform=eval_transform(SPEC),
                              global_batch=4, rank=0, world=1, num_workers=2, seed=0, epoch=epoch)
        batches = iter(stream)
        next(batches)
        seen.append(_worker_pids())
        list(batches)
        exhaustive = iter(exhaustive_loader(shards, None, transform=eval_transform(SPEC), batch_size=4,
                                            rank=0, world=1, num_workers=2))
        next(exhaustive)
        seen.append(_worker_pids())
        list(exhaustive)
    assert len(seen[0]) == 2 and all(pids == seen[0] for pids in seen)
    server = {c.pid for c in psutil.Process().children()}  # the fork server among this process's children
    assert len({psutil.Process(p).ppid() for p in seen[0]} & server) == 1
    close_loader_workers()
    assert not _worker_pids()


@pytest.mark.parametrize("stop_after", [1, 3])
def test_an_epoch_left_unfinished_leaves_no_trace_in_the_next(shards, stop_after):
    """A consumer that stops early (a stop request) keeps the workers; the batches of the unfinished epoch
    still in flight must not reach the next one, which reads exactly what it reads on new workers."""
    expected = list(_epoch(shards, world=1, rank=0, workers=2, seed=3, epoch=1))
    close_loader_workers()
    first = iter(_epoch(shards, world=1, rank=0, workers=2, seed=3, epoch=0))
    for _ in range(stop_after):
        next(first)
    workers = _worker_pids()
    first.close()  # generator closed mid-epoch, as when train_epoch raises StopRun
    again = list(_epoch(shards, world=1, rank=0, workers=2, seed=3, epoch=1))
    assert len(workers) == 2 and _worker_pids() == workers  # the same workers
    assert len(again) == len(expected)
    for a, b in zip(expected, again, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


@pytest.mark.timeout(60)  # the failure this guards against is a hang
def test_a_part_that_cannot_be_sent_fails_at_once_and_the_pool_starts_afresh(shards):
    """A part that does not pickle (a lambda transform) must fail in the caller, not leave its worker
    waiting for it forever; the workers that did get a part are shut down, the next stream gets new ones."""
    n = shards[-1].first_run_id + shards[-1].count
    list(_epoch(shards, world=1, rank=0, workers=2, seed=3, epoch=0))
    workers = _worker_pids()
    with pytest.raises((AttributeError, pickle.PicklingError), match="lambda|local"):
        list(train_loader(shards, fixture_include(n), fixture_targets(n), transform=lambda image: image,
                          global_batch=6, rank=0, world=1, num_workers=2, seed=3, epoch=1))
    assert not _worker_pids() & workers
    again = list(_epoch(shards, world=1, rank=0, workers=2, seed=3, epoch=1))
    close_loader_workers()
    fresh = list(_epoch(shards, world=1, rank=0, workers=2, seed=3, epoch=1))
    assert [b[2].tolist() for b in again] == [b[2].tolist() for b in fresh]


@pytest.mark.timeout(60)  # the failure this guards against is a hang
def test_a_worker_killed_between_epochs_is_replaced(shards):
    """A worker that died while idle (the OOM killer's pick) must not fail the next epoch: new workers."""
    import signal
    import time

    import psutil

    expected = list(_epoch(shards, world=1, rank=0, workers=2, seed=3, epoch=1))
    workers = _worker_pids()
    os.kill(min(workers), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while psutil.pid_exists(min(workers)) and time.monotonic() < deadline:  # gone and reaped by the server
        time.sleep(0.05)
    again = list(_epoch(shards, world=1, rank=0, workers=2, seed=3, epoch=1))
    assert not _worker_pids() & workers
    assert [b[2].tolist() for b in again] == [b[2].tolist() for b in expected]


@pytest.mark.timeout(60)  # the failure this guards against is a hang
def test_a_forked_child_leaves_its_parents_workers_alone(shards):
    """A child forked from a process with kept workers must not stop them when it lets go of its copy."""
    list(_epoch(shards, world=1, rank=0, workers=2, seed=3, epoch=0))
    workers = _worker_pids()
    pid = os.fork()
    if pid == 0:  # the child: drop everything, as a child process's exit would
        close_loader_workers()
        import gc

        gc.collect()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    expected = list(_epoch(shards, world=1, rank=0, workers=2, seed=3, epoch=1))
    assert _worker_pids() == workers and len(expected) == _epoch(shards, world=1, rank=0, workers=2).steps


def test_two_streams_read_at_once_each_get_their_own_batches(shards):
    """A second stream read while another is being read gets workers of its own, not the other's, and
    they end with it."""
    alone = [list(_epoch(shards, world=1, rank=0, workers=2, seed=s, epoch=0)) for s in (1, 2)]
    kept = _worker_pids()
    together = list(zip(_epoch(shards, world=1, rank=0, workers=2, seed=1, epoch=0),
                        _epoch(shards, world=1, rank=0, workers=2, seed=2, epoch=0), strict=True))
    for k, (a, b) in enumerate(together):
        assert torch.equal(a[2], alone[0][k][2]) and torch.equal(b[2], alone[1][k][2])
        assert torch.equal(a[0], alone[0][k][0]) and torch.equal(b[0], alone[1][k][0])
    assert _worker_pids() == kept


_KILLED_TRAINER = """
import json, os, signal, sys
import psutil, torch
from fer_dist.data.augment import InputSpec, eval_transform
from fer_dist.data.stream import ShardSet, train_loader

def main():
    shards = ShardSet([(sys.argv[1], ["train"])]).shards(0)
    n = shards[-1].first_run_id + shards[-1].count
    stream = train_loader(shards, torch.ones(n, dtype=torch.bool), torch.zeros(n, 7),
                          transform=eval_transform(InputSpec(8, 1, (0.0,), (1.0,))), global_batch=2, rank=0,
                          world=1, num_workers=2, seed=0, epoch=0)
    batches = iter(stream)  # held: the loader and its workers stay up
    next(batches)
    print(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # a trainer killed outright: no clean-up runs

if __name__ == "__main__":
    main()
"""


def test_a_trainer_killed_outright_leaves_no_workers_behind(shard_dir, tmp_path):
    """The fork server and its workers outlive nothing: they go when the process that started them dies."""
    import json
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "killed_trainer.py"
    script.write_text(_KILLED_TRAINER)
    done = subprocess.run([sys.executable, str(script), str(shard_dir)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -9, done.stderr
    left = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(left) >= 3  # the fork server, two workers (their parent) and the resource tracker
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() !=
                                              psutil.STATUS_ZOMBIE for p in left):
        time.sleep(0.5)
    alive = [p for p in left if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, [psutil.Process(p).cmdline()[-1][:80] for p in alive]
