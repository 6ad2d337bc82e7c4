"""Streams over shard directories: the training stream (equal steps per rank) and the exhaustive pass.

Stages, in open_clip's order, each a named step below:
  shard list (ShardSet, one id offset per directory)
  -> plan (fer_dist/data/plan.py, from the manifest's id ranges and the include mask, before any read):
     shard order shuffled by (seed, epoch), cut into rank windows balanced by SELECTED count, each cut
     again among the rank's DataLoader workers; every worker has a computed batch quota
  -> index the shards read (fer_dist/data/shardread.py, once per process: every header checked, member
     names against the allow-list; the main process indexes, each worker is sent the indexes it lacks),
     then read the worker's pieces: only the selected samples' members
  -> shuffle buffer over the raw PNG bytes, seeded by (seed, epoch, rank, worker role)
  -> skip the batches a resumed run already trained on (no decode, no transform)
  -> decode (PNG only) -> transform (torch's RNG seeded per batch) -> batch, in the worker.

The DataLoader runs with batch_size=None: batching happens in the workers, so each worker yields exactly its
quota of full batches and the quotas sum to the rank's steps; every rank therefore yields `steps` batches of
`global_batch // world` samples whatever the shard sizes, world size and worker count. The stream is not
passed through accelerator.prepare, which would split it again. A process starts its loader workers once
(_WorkerPool) and sends each epoch's parts to them: every stream it reads, train or exhaustive, runs on them.

Augmentation is reproducible: before each batch, a worker seeds torch's generator from
(seed, epoch, rank, role, batch index), so batch k is the same whether the epoch ran through or resumed
with skip_batches (with the same world size, workers and global batch). With num_workers == 0 the seeding
happens inside torch.random.fork_rng so the trainer's own generator is left untouched.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing import forkserver, resource_tracker
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fer_dist.data import plan as planning
from fer_dist.data.augment import Transform
from fer_dist.data.integrity import checked_labels
from fer_dist.data.manifest import Manifest, read_manifest
from fer_dist.data.shardread import (
    ShardIndex,
    decode_png,
    index_key,
    index_shard,
    indexed,
    parse_cls,
    read_samples,
    remember,
)
from fer_dist.errors import FerDistError

SHUFFLE_BUFFER = 1000  # raw samples held per worker; PNG faces are a few KB each


@dataclass(frozen=True)
class RunShard:
    """One shard as a run sees it: its samples hold run ids first_run_id .. first_run_id + count - 1."""

    path: Path
    count: int
    first_run_id: int
    labelled: int
    offset: int = 0  # the directory's id offset: tar key = run id - offset

    def index(self) -> ShardIndex:
        """The shard's member index (walked and checked once per process, then cached)."""
        return index_shard(str(self.path), self.first_run_id - self.offset, self.count)


def load_manifest(directory: Path) -> Manifest:
    """A shard directory's manifest, checked for the id ranges the streams rely on."""
    manifest = read_manifest(Path(directory))
    for split, info in manifest.splits.items():
        for shard in info.shards:
            if shard.first_id < 0 or shard.first_id + shard.count > manifest.num_ids:
                raise FerDistError(f"{directory}/manifest.json: split {split}: shard {shard.file} has ids "
                                   f"beyond num_ids {manifest.num_ids}")
    return manifest


class ShardSet:
    """Shard directories in one id space: directory k's ids are offset by the earlier ones' num_ids."""

    def __init__(self, entries: Sequence[tuple[str | Path, Sequence[str]]]) -> None:
        self.entries: list[tuple[Path, tuple[str, ...]]] = [(Path(d).resolve(), tuple(s)) for d, s in entries]
        self.manifests: dict[Path, Manifest] = {}
        self._offsets: dict[Path, int] = {}
        total = 0
        for directory, _ in self.entries:
            if directory not in self.manifests:
                self.manifests[directory] = load_manifest(directory)
                self._offsets[directory] = total
                total += self.manifests[directory].num_ids
        self.num_ids = total

    @property
    def offsets(self) -> list[dict]:
        """What fixes the id space, per directory in order: saved with a run and compared on resume."""
        return [{"dataset": m.dataset, "fingerprint": m.source.get("fingerprint"),
                 "num_ids": m.num_ids, "offset": self._offsets[d]} for d, m in self.manifests.items()]

    def shards(self, entry: int) -> list[RunShard]:
        """The shards of entry `entry` (its splits in the order named, each in id order)."""
        directory, splits = self.entries[entry]
        manifest, offset = self.manifests[directory], self._offsets[directory]
        out = []
        for split in splits:
            if split not in manifest.splits:
                have = ", ".join(manifest.splits)
                raise FerDistError(f"{directory}: no split {split!r} (it has {have})")
            for s in manifest.splits[split].shards:
                path = directory / s.file
                if not path.is_file():
                    raise FerDistError(f"{path}: shard listed in the manifest is missing")
                out.append(RunShard(path, s.count, offset + s.first_id, s.labelled, offset))
        return out


def read_labels(shardset: ShardSet) -> torch.Tensor:
    """[num_ids] long: each sample's class from its `.cls` member, -1 if unlabelled or in no split named.

    Every sample is checked against its manifest digest on the way (integrity.py): a damaged one raises.
    """
    return checked_labels(shardset).labels


@dataclass(frozen=True)
class _Failure:
    """A worker's FerDistError, passed as data so the main process re-raises it as one line."""

    message: str


def _shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A shuffle buffer: hold `size` items, emit a random one as each new item arrives, then the rest.

    The slots are drawn a thousand at a time: one draw per sample from `random` cost as much as reading it.
    """
    items = iter(items)
    buf = list(itertools.islice(items, size))
    slots: Iterator[int] = iter(())
    for item in items:
        j = next(slots, None)
        if j is None:
            slots = iter(rng.integers(0, size, 1024).tolist())
            j = next(slots)
        yield buf[j]
        buf[j] = item
    for j in rng.permutation(len(buf)).tolist():
        yield buf[j]


class _Stream(IterableDataset):
    """The per-worker stages after planning: read -> (shuffle) -> skip -> decode -> transform -> batch.

    A stream holds one plan per worker role; what one process iterates is one role's part (`part`)."""

    def __init__(self, shards: Sequence[RunShard], plans: list[planning.SlotPlan], *, transform: Transform,
                 batch_size: int, labels: bool, seed: tuple[int, ...] | None, shuffle_buffer: int) -> None:
        self.shards = list(shards)
        self.plans, self.transform, self.batch_size = plans, transform, batch_size
        self.labels, self.seed, self.shuffle_buffer = labels, seed, shuffle_buffer
        self.index_keys: dict[int, tuple] = {}  # shard -> the index to read it by (load_indexes)

    def part(self, role: int) -> _Stream:
        """The stream of one worker role: what that worker is sent and iterates."""
        part = _Stream(self.shards, [self.plans[role]], transform=self.transform, batch_size=self.batch_size,
                       labels=self.labels, seed=self.seed, shuffle_buffer=self.shuffle_buffer)
        part.index_keys = {shard: self.index_keys[shard] for shard in self.plans[role].shards_read()}
        return part

    def __iter__(self) -> Iterator:
        if len(self.plans) != 1:
            raise RuntimeError(f"a stream of {len(self.plans)} worker roles: iterate one role's part()")
        try:
            yield from self._batches(self.plans[0], in_worker=get_worker_info() is not None)
        except FerDistError as err:
            yield _Failure(str(err))

    def load_indexes(self) -> dict[int, ShardIndex]:
        """Index the shards the plans read, in this process (once per file version; workers are sent the
        indexes, not the work), and read them by these very indexes: a shard file that changes afterwards
        is refused, not indexed again. A bad shard fails here, in the main process, naming it."""
        indexes = {shard: self.shards[shard].index() for plan in self.plans for shard in plan.shards_read()}
        self.index_keys = {shard: index_key(index) for shard, index in indexes.items()}
        return indexes

    def _raw(self, plan: planning.SlotPlan) -> Iterator[tuple[str, int, int, dict[str, bytes]]]:
        """(shard path, sample key, run id, members) for the plan's pieces, in order."""
        fields = ("cls", "png") if self.labels else ("png",)
        for piece in plan.pieces:
            shard = self.shards[piece.shard]
            index = indexed(self.index_keys[piece.shard])  # made here, or sent here and remembered
            for key, members in read_samples(index, piece.ids - shard.offset, fields):
                yield index.path, key, shard.offset + key, members

    def _batches(self, plan: planning.SlotPlan, in_worker: bool) -> Iterator[tuple[torch.Tensor, ...]]:
        raw = self._raw(plan)
        if self.seed is not None:
            rng = np.random.default_rng(planning.derive_seed(*self.seed, plan.role))
            raw = _shuffled(raw, self.shuffle_buffer, rng)
        raw = itertools.islice(raw, plan.skip * self.batch_size, None)  # skipped: read, never decoded
        for k in range(plan.batches):
            chunk = list(itertools.islice(raw, self.batch_size))
            # fork_rng keeps the trainer's generator untouched when the stream runs in the main process
            with nullcontext() if in_worker else torch.random.fork_rng(devices=[]):
                if self.seed is not None:
                    # the CPU generator only: torch.manual_seed would also queue a CUDA seeding call,
                    # with a formatted stack, on every batch of the epoch
                    seed = planning.derive_seed(*self.seed, plan.role, plan.skip + k)
                    torch.default_generator.manual_seed(seed)
                images = pack_batch([self.transform(decode_png(m.get("png"), path, key))
                                     for path, key, _, m in chunk])
            # ids and labels travel as lists: a tensor would cost a shared-memory segment of its own per
            # batch (0.4 ms each way for a batch of 32)
            ids = [rid for _, _, rid, _ in chunk]
            if not self.labels:
                yield images, ids
                continue
            yield images, [parse_cls(m.get("cls"), path, key) for path, key, _, m in chunk], ids


# Batches up to this size leave a worker as bytes in the pickle; larger ones as a tensor in shared memory.
# DataLoader gives every tensor a shared-memory segment of its own (create, map, pass the descriptor, map
# again): ~1.7 ms of CPU per batch whatever its size, where a 110 KB batch (16 faces, 3 x 48 x 48) costs
# ~0.6 ms through the pipe; at 885 KB (128 faces) the segment is cheaper.
INLINE_BATCH = 256 << 10

Packed = torch.Tensor | tuple[bytearray, tuple[int, ...]]


def pack_batch(faces: list[torch.Tensor]) -> Packed:
    """Stack uint8 faces into a batch for the trip from a loader worker: in a bytearray when small."""
    shape = (len(faces), *faces[0].shape)
    size = len(faces) * faces[0].numel()
    if faces[0].dtype != torch.uint8 or size > INLINE_BATCH:
        return torch.stack(faces)
    buf = bytearray(size)
    torch.stack(faces, out=torch.frombuffer(buf, dtype=torch.uint8).view(shape))
    return buf, shape


def unpack_batch(batch: Packed) -> torch.Tensor:
    """The batch tensor (sharing the bytearray's memory, no copy)."""
    if isinstance(batch, torch.Tensor):
        return batch
    buf, shape = batch
    return torch.frombuffer(buf, dtype=torch.uint8).view(shape)


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}  # SIGINT: Ctrl-C reaches the whole group
_RUNPY_ALREADY_IMPORTED = "ignore::RuntimeWarning:runpy"


def _iterate(loader: DataLoader) -> Iterator:
    """Iterate a loader whose workers start with the stop signals blocked.

    PyTorch's workers install a SIGTERM handler that exits; a stop request arriving between a worker's start
    and its first batch would kill it. Blocked (the fork server's mask, which its workers inherit), the
    signal waits in the worker until _worker_start ignores it; in this process it waits until the workers
    are started, when its handler runs as usual.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        it = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    yield from it


def start_worker_server() -> None:
    """Start the loader workers' fork server now (it takes seconds to import its modules: a trainer calls
    this early, so the import overlaps its own set-up); a no-op once it runs.

    The server starts with SIGTERM and SIGUSR1 blocked and keeps them so: SLURM's SIGTERM to every process
    of the job must not kill it, or the next loader could not start; its workers inherit the mask.
    """
    worker_context()  # the server's preload list
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        # Starting multiprocessing's resource tracker unblocks SIGTERM in this thread (bpo-33613's fix):
        # start it first, then block again, so that the fork server starts blocked.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        # Each worker re-runs the main module, which the server has preloaded: runpy warns that it is
        # already imported (by design here), once per worker. The server's command line carries this
        # process's -W options (sys.warnoptions); its workers inherit its filters.
        sys.warnoptions.append(_RUNPY_ALREADY_IMPORTED)
        try:
            forkserver.ensure_running()
        finally:
            sys.warnoptions.remove(_RUNPY_ALREADY_IMPORTED)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker_start(owner: int, worker_id: int) -> None:
    """DataLoader's worker_init_fn: stop signals ignored, the inherited heap frozen, the worker's life tied to
    the process that made the loader (`owner`).

    DataLoader's own watchdog watches the worker's parent, here the fork server, and misses an owner
    killed outright while the worker was starting (the server gone first, the worker then never sees its
    parent change). A daemon thread checks the owner every second and ends the worker when it is gone.
    """
    # SLURM signals every process of the job: a stop request is the trainer's to handle at a step boundary;
    # a loader worker dying of it would crash the step instead. The worker started with these signals
    # blocked (the fork server's mask), so none got through before this point.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    # The worker inherits its fork server's heap (torch, OpenCV, the main module); full collections walking
    # it (and copying its pages) would cost every epoch. The worker's own objects are still collected.
    gc.freeze()
    _drop_server_keepalive()

    def watch() -> None:
        while True:
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass  # the pid exists (it may have been reused; then the server's exit still ends us)
            time.sleep(1.0)

    threading.Thread(target=watch, name="fer-dist-owner-watch", daemon=True).start()


def _drop_server_keepalive() -> None:
    """In a worker: close its copy of the descriptor that keeps the fork server alive.

    The server exits when the last copy closes; multiprocessing hands one to every process it starts, so
    workers alive would keep it up after a trainer killed outright, and the workers with it (DataLoader's
    watchdog watches their parent, the server). Closed here, the server exits with the trainer; the workers
    go with their owner watch (_worker_start).
    """
    fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if fd is not None:
        forkserver._forkserver._forkserver_alive_fd = None
        with contextlib.suppress(OSError):
            os.close(fd)


def _as_is(batch: tuple) -> tuple:
    return batch


@functools.cache
def worker_context() -> multiprocessing.context.BaseContext:
    """How loader workers start: forked from a fork server, not from the trainer (POSIX; the stop signals
    this module handles are POSIX's too).

    Forking the trainer itself, a process with other threads (gloo's, queue feeders of the last epoch's
    loader), can leave the child waiting forever on a lock one of them held: CPython before 3.11.8 does so
    in `PyOS_AfterFork_Child` (gh-112275; seen here as a quick start stuck at round 8). The fork server is
    started once (fork + exec: no inherited locks), imports the stream's modules once, and forks each
    worker from its single thread; the workers also stop sharing the trainer's memory, whose copy-on-write
    pages the trainer would otherwise pay for after every epoch's fork. Workers are started once per
    process and kept (_WorkerPool); each epoch's part reaches them pickled through a queue.
    """
    ctx = multiprocessing.get_context("forkserver")
    # Each worker re-runs the main module as __mp_main__ (as under spawn: `-m fer_dist.train` runs
    # fer_dist.train's body, a script runs the script; CPython's "__main__" preload never applies). With
    # the trainer's imports loaded once in the server, that costs the module's body, not 2 s of imports.
    main = getattr(sys.modules["__main__"], "__spec__", None)
    preload = [__name__, "fer_dist.train"]
    ctx.set_forkserver_preload(preload + [main.name] if main is not None and main.name not in preload
                               else preload)
    return ctx


class _Parts(IterableDataset):
    """What a pool's workers iterate: each epoch, the part of a stream that their own queue brings, with the
    shard indexes they have not been sent before."""

    def __init__(self, queues: list) -> None:
        self.queues = queues

    def __iter__(self) -> Iterator:
        part, indexes = ForkingPickler.loads(self.queues[get_worker_info().id].get())
        for index in indexes:
            remember(index)
        yield from part


class _WorkerPool:
    """A process's loader workers, started once and kept for every later epoch and stream.

    Starting workers cost every epoch ~35 ms before its first batch and ~17 ms at its end (fork, unpickling
    the stream, shutdown); kept, they cost it once per run. Each epoch every worker is sent its part of the
    stream (its plan, and the indexes of the shards it has not been sent yet) through a queue of its own,
    then DataLoader's persistent workers iterate it. DataLoader's reset gives every worker a task after its
    resume message, so each worker takes exactly one part per epoch, and hands batches out round-robin from
    worker 0 as new workers would. A consumer that stops early leaves the pool usable (the next reset drops
    batches still in flight); an error while sending or reading shuts it down.
    """

    def __init__(self, num_workers: int) -> None:
        ctx = worker_context()
        start_worker_server()  # a no-op where the trainer started it with its set-up
        self.busy, self.closed = False, False
        self.queues = [ctx.Queue() for _ in range(num_workers)]
        self.sent: list[set[tuple]] = [set() for _ in range(num_workers)]  # index keys each worker holds
        # An own generator: DataLoader otherwise draws its workers' base seed from the trainer's global one
        # (the stream seeds every batch itself). collate_fn: the batches are made; DataLoader's default
        # would walk every id of every batch.
        self.loader = DataLoader(_Parts(self.queues), batch_size=None, num_workers=num_workers,
                                 persistent_workers=True, generator=torch.Generator().manual_seed(0),
                                 collate_fn=_as_is, multiprocessing_context=ctx,
                                 worker_init_fn=functools.partial(_worker_start, os.getpid()))
        _LIVE.add(self)

    def usable(self) -> bool:
        """Open, with every worker alive: one killed while idle (the OOM killer's pick) would fail the next
        epoch after DataLoader's 5 s check, where new workers can carry on."""
        it = self.loader._iterator
        return not self.closed and (it is None or all(w.is_alive() for w in it._workers))

    def run(self, stream: _Stream) -> Iterator:
        """The stream's items from the workers, in the plan's round-robin order."""
        if len(stream.plans) != len(self.queues):
            raise RuntimeError(f"{len(stream.plans)} worker roles for a pool of {len(self.queues)} workers")
        indexes = stream.load_indexes()
        self.busy, failed = True, True
        try:
            for role, (queue, sent) in enumerate(zip(self.queues, self.sent, strict=True)):
                part = stream.part(role)
                new = [indexes[shard] for shard in part.index_keys if index_key(indexes[shard]) not in sent]
                # Pickled here, not in the queue's feeder thread, where an error would only be printed and
                # the worker would wait for its part forever.
                queue.put(bytes(ForkingPickler.dumps((part, new))))
                sent.update(index_key(index) for index in new)
            yield from _iterate(self.loader)
            failed = False
        except GeneratorExit:  # the consumer stopped early: nothing wrong with the workers
            failed = False
            raise
        finally:
            self.busy = False
            if failed:  # a part sent to some workers only, or a worker's error: start afresh next time
                self.close()

    def close(self) -> None:
        """Shut the workers down; parts they never read are dropped."""
        self.closed = True
        end_persistent_workers(self.loader)
        for queue in self.queues:
            queue.cancel_join_thread()  # parts never read are dropped: no flush to wait for
            queue.close()


def end_persistent_workers(loader: DataLoader) -> None:
    """Shut down a DataLoader's persistent workers now: DataLoader keeps them, with its last iterator,
    until that iterator is garbage (DataLoader's private `_iterator` and `_shutdown_workers`)."""
    it, loader._iterator = loader._iterator, None
    if it is not None:
        it._shutdown_workers()


_POOLS: dict[int, _WorkerPool] = {}  # this process's pools, by number of workers
_LIVE: weakref.WeakSet[_WorkerPool] = weakref.WeakSet()  # every pool of this process, transient ones too
_DISOWNED: list[_WorkerPool] = []  # a forked child's copies of its parent's pools, never to be touched


def _items(stream: _Stream, num_workers: int) -> Iterator:
    """A stream's items: read here (num_workers == 0) or by this process's pool of loader workers."""
    if num_workers == 0:
        stream.load_indexes()
        yield from stream.part(0)
        return
    pool = _POOLS.get(num_workers)
    if pool is not None and pool.busy:  # another stream of this process is being read: workers of its own
        transient = _WorkerPool(num_workers)
        try:
            yield from transient.run(stream)
        finally:
            transient.close()
        return
    if pool is None or not pool.usable():
        if pool is not None:
            pool.close()
        pool = _POOLS[num_workers] = _WorkerPool(num_workers)
    yield from pool.run(stream)


def close_loader_workers() -> None:
    """Shut down this process's loader workers (the trainer's end, and at exit: the workers ignore the
    SIGTERM that multiprocessing's own exit handler would send them, then wait for forever)."""
    for pool in list(_LIVE):
        if not pool.closed:
            pool.close()
    _POOLS.clear()


def _disown_pools() -> None:
    """In a child forked from this process: the parent's pools are not the child's to use or shut down.
    Garbage collected here, their DataLoader iterator would set the event that tells the parent's workers
    to stop; disarmed and kept, nothing of theirs runs."""
    for pool in list(_LIVE):
        it = pool.loader._iterator
        if it is not None:
            it._shutdown = True  # its __del__ then does nothing
        pool.closed = True
        _DISOWNED.append(pool)
    _POOLS.clear()


atexit.register(close_loader_workers)
os.register_at_fork(after_in_child=_disown_pools)


def _check_mask(include: torch.Tensor) -> np.ndarray:
    if include.dtype != torch.bool or include.dim() != 1:
        raise FerDistError(f"include must be a 1-D bool mask, got {include.dtype} {tuple(include.shape)}")
    return include.cpu().numpy()


def _selected(shards: Sequence[RunShard], mask: np.ndarray) -> list[np.ndarray]:
    return planning.selected_ids([(s.first_run_id, s.count) for s in shards], mask)


class TrainStream:
    """One epoch of one rank: `steps` batches in all; iterating yields the `steps - skip_batches` left."""

    def __init__(self, dataset: _Stream, targets: torch.Tensor, steps: int, skip: int, workers: int) -> None:
        self.steps, self.skip, self.batch_size = steps, skip, dataset.batch_size
        self._dataset, self._targets, self._workers = dataset, targets, workers

    def __len__(self) -> int:
        return self.steps - self.skip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = 0
        for item in _items(self._dataset, self._workers) if len(self) else ():
            if isinstance(item, _Failure):
                raise FerDistError(item.message)
            images, ids = unpack_batch(item[0]), torch.tensor(item[1], dtype=torch.long)
            yield images, self._targets.index_select(0, ids.to(self._targets.device)), ids
            n += 1
        if n != len(self):  # the plan guarantees it; a shortfall would hang the other ranks' collectives
            raise RuntimeError(f"train stream yielded {n} batches, planned {len(self)}")


def train_loader(
    shards: list[RunShard],
    include: torch.Tensor,
    targets: torch.Tensor,
    *,
    transform: Transform,
    global_batch: int,
    rank: int,
    world: int,
    num_workers: int,
    seed: int,
    epoch: int,
    skip_batches: int = 0,
    shuffle_buffer: int = SHUFFLE_BUFFER,
) -> TrainStream:
    """This rank's training stream: `steps` batches of global_batch // world (images, targets, ids)."""
    mask = _check_mask(include)
    if targets.dim() != 2 or targets.shape[0] != include.shape[0] or not targets.is_floating_point():
        raise FerDistError(f"targets: need a float table [{include.shape[0]}, K], not {tuple(targets.shape)}")
    if shuffle_buffer < 1:
        raise FerDistError(f"shuffle_buffer: {shuffle_buffer} is not a positive number of samples")
    selected = _selected(shards, mask)
    if not any(s.size for s in selected):
        raise FerDistError("train_loader: the include mask selects none of the given shards' samples")
    steps, plans = planning.train_plan(selected, global_batch=global_batch, world=world, rank=rank,
                                       workers=num_workers, seed=seed, epoch=epoch, skip=skip_batches)
    dataset = _Stream(shards, plans, transform=transform, batch_size=global_batch // world, labels=False,
                      seed=(seed, epoch, rank), shuffle_buffer=shuffle_buffer)
    return TrainStream(dataset, targets, steps, skip_batches, num_workers)


class ExhaustiveStream:
    """One rank's share of an exhaustive pass: `samples` samples in `batches` batches (ranks may differ)."""

    def __init__(self, dataset: _Stream, num_workers: int) -> None:
        self.batches = sum(p.batches for p in dataset.plans)
        self.samples = sum(p.samples for p in dataset.plans)
        self._dataset, self._workers = dataset, num_workers

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for item in _items(self._dataset, self._workers) if self.samples else ():
            if isinstance(item, _Failure):
                raise FerDistError(item.message)
            images, labels, ids = item
            yield (unpack_batch(images), torch.tensor(labels, dtype=torch.long),
                   torch.tensor(ids, dtype=torch.long))


def exhaustive_loader(
    shards: list[RunShard],
    include: torch.Tensor | None,
    *,
    transform: Transform,
    batch_size: int,
    rank: int,
    world: int,
    num_workers: int,
) -> ExhaustiveStream:
    """Every selected sample exactly once across ranks and workers, unaugmented: (images, labels, ids)."""
    if include is None:
        mask = np.ones(max((s.first_run_id + s.count for s in shards), default=0), dtype=bool)
    else:
        mask = _check_mask(include)
    plans = planning.exhaustive_plan(_selected(shards, mask), batch_size=batch_size, world=world, rank=rank,
                                     workers=num_workers)
    dataset = _Stream(shards, plans, transform=transform, batch_size=batch_size, labels=True, seed=None,
                      shuffle_buffer=0)
    return ExhaustiveStream(dataset, num_workers)
