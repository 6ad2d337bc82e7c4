"""Streams over shard directories: training (the same global batches on any number of processes and
loader workers) and the exhaustive pass (each selected id once across processes).

Stages: shard list (shardset.py: one id offset per directory) -> plan (plan.py, pure, in the main process)
-> batch sampler (PassSampler: this rank's slice of each global batch, each id's augmentation seed) ->
DataLoader workers (ShardSamples: allow-listed members read through each shard's checked index,
PNG decoded, transformed, stacked) -> the main process pairs each id with its row of the target table,
which never travels to a worker. One DataLoader per kind of stream is kept for the process's life, its
workers persistent; each pass sets its batch sampler and iterates it again. The loaders stay out of
accelerator.prepare(), which would split or dispatch them a second time.
"""

from __future__ import annotations

import atexit
import functools
import gc
import multiprocessing
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing.connection import wait

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from fer_dist.data import plan as planning
from fer_dist.data.augment import Transform
from fer_dist.data.runset import RunShard
from fer_dist.data.shardread import decode_png, parse_cls, read_samples
from fer_dist.errors import FerDistError
from fer_dist.stopsignals import STOP_SIGNALS, ensure_resource_tracker, stop_signals_blocked

# Batches up to this size leave a worker as bytes in the pickle; larger ones as a tensor in shared memory.
# DataLoader gives every tensor a shared-memory segment of its own (create, map, pass the descriptor, map
# again), a fixed cost per batch that exceeds the pipe's copy of a small batch (BENCHMARKS.md).
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


@dataclass(frozen=True)
class _Failure:
    """A worker's FerDistError as data: DataLoader would re-raise it inside a traceback's text."""

    message: str


Item = tuple[int, int | None]  # (run id, augmentation seed; None: nothing random)


class ShardSamples(Dataset):
    """Samples by run id from a list of shards (map-style); a batch is read, decoded, transformed, stacked."""

    def __init__(self, shards: Sequence[RunShard], transform: Transform, labels: bool) -> None:
        self.shards = sorted(set(shards), key=lambda s: s.first_run_id)
        if _overlapping(self.shards):
            raise FerDistError("shards with overlapping run ids cannot be read as one set")
        self.firsts = np.array([s.first_run_id for s in self.shards], dtype=np.int64)
        # Indexed here, in the main process (a bad shard fails here, naming itself), and sent to the workers
        # with the dataset: read_samples refuses a file changed since, unlike the one the label pass checked.
        self.indexes = [s.index() for s in self.shards]
        self.transform, self.labels = transform, labels

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    def __getitem__(self, item: Item) -> tuple | _Failure:
        return self.__getitems__([item])  # a batch of one

    def __getitems__(self, items: list[Item]) -> tuple | _Failure:
        """(images packed, ids, labels or None) for the batch `items`, or the _Failure that stopped it."""
        try:
            return self._batch(items)
        except FerDistError as err:
            return _Failure(str(err))

    def _batch(self, items: list[Item]) -> tuple:
        ids = np.array([rid for rid, _ in items], dtype=np.int64)
        which = np.searchsorted(self.firsts, ids, side="right") - 1
        fields = ("cls", "png") if self.labels else ("png",)
        found: list = [None] * len(items)
        for k in np.unique(which).tolist():
            rows = np.flatnonzero(which == k)
            index = self.indexes[k]
            read = read_samples(index, ids[rows] - self.shards[k].offset, fields)
            for row, (key, members) in zip(rows.tolist(), read, strict=True):
                found[row] = (index.path, key, members)
        # fork_rng: read in the main process (num_workers 0), the trainer's own generator stays untouched
        with nullcontext() if get_worker_info() is not None else torch.random.fork_rng(devices=[]):
            faces = []
            for (_, seed), (path, key, members) in zip(items, found, strict=True):
                if seed is not None:  # the CPU generator only: torch.manual_seed would also seed CUDA
                    torch.default_generator.manual_seed(seed)
                faces.append(self.transform(decode_png(members.get("png"), path, key)))
        labels = [parse_cls(m.get("cls"), p, k) for p, k, m in found] if self.labels else None
        # ids and labels travel as lists: a tensor would cost a shared-memory segment of its own per batch
        return pack_batch(faces), ids.tolist(), labels


def _overlapping(shards: Sequence[RunShard]) -> bool:
    """Whether two of the shards (sorted by first run id) claim the same run id."""
    return any(a.first_run_id + a.count > b.first_run_id for a, b in zip(shards, shards[1:], strict=False))


class PassSampler(Sampler):
    """This rank's batches of the current pass: lists of (run id, seed). Set before each pass (as
    DistributedSampler.set_epoch is), so one DataLoader and its workers serve every pass of its kind."""

    def __init__(self) -> None:
        self.ids: Sequence[np.ndarray] = []
        self.seeds: Sequence[np.ndarray] | None = None

    def set_pass(self, ids: Sequence[np.ndarray], seeds: Sequence[np.ndarray] | None) -> None:
        """The next pass's batches of ids and, for augmented streams, their seeds (same shapes)."""
        self.ids, self.seeds = ids, seeds

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[list[Item]]:
        return self._batches(self.ids, self.seeds)  # this pass's, even if the next one is set meanwhile

    @staticmethod
    def _batches(ids: Sequence[np.ndarray], seeds: Sequence[np.ndarray] | None) -> Iterator[list[Item]]:
        for j, batch in enumerate(ids):
            row = seeds[j].tolist() if seeds is not None else [None] * len(batch)
            yield list(zip(batch.tolist(), row, strict=True))


# Each worker re-runs the main module, which its fork server preloaded (worker_context): runpy warns that
# the module is already imported, by design here, once per worker.
warnings.filterwarnings("ignore", message=r".*found in sys\.modules after import of package",
                        category=RuntimeWarning, module="runpy")


@functools.cache
def worker_context() -> multiprocessing.context.BaseContext:
    """Loader workers fork from a fork server, not from the trainer: forking a process with other threads
    (gloo's, queue feeders) can leave the child stuck forever in CPython before 3.11.8 (gh-112275). The
    server imports the stream's and the trainer's modules once, so a worker starts without importing them."""
    ctx = multiprocessing.get_context("forkserver")
    main = getattr(sys.modules["__main__"], "__spec__", None)
    preload = [__name__, "fer_dist.train"]
    ctx.set_forkserver_preload(preload + [main.name] if main is not None and main.name not in preload
                               else preload)
    return ctx


def _start(loader: DataLoader) -> Iterator:
    """iter(loader), with the stop signals blocked while it may start the workers and their fork server.

    A stop request is the trainer's to handle at a step boundary (SLURM signals every process of the
    job). Started blocked, multiprocessing's resource tracker and the fork server never take one (SIGUSR1
    would end them), the workers hold any until _worker_init ignores them; here it waits until the workers
    are started.
    """
    if not loader.num_workers:
        return iter(loader)
    ensure_resource_tracker()
    with stop_signals_blocked():
        return iter(loader)


def _worker_init(worker_id: int) -> None:
    """DataLoader's worker_init_fn: stop signals ignored, the inherited heap frozen, the worker's life tied
    to the trainer's.

    DataLoader's own watchdog watches the worker's parent, here the fork server, which every worker's copy
    of its keep-alive descriptor keeps alive: a trainer killed outright would leave server and workers
    behind. multiprocessing.parent_process() is the trainer; its sentinel becomes readable when it dies.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    # The server's heap (torch, OpenCV, the trainer's modules): full collections walking it would copy its
    # pages into every worker. The worker's own objects are still collected.
    gc.freeze()
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()


def _exit_with(sentinel: int) -> None:
    wait([sentinel])
    os._exit(0)


def _as_is(batch: tuple) -> tuple:
    """collate_fn: the dataset makes whole batches (DataLoader's default would walk every id)."""
    return batch


@dataclass
class _Kept:
    """A DataLoader kept for every pass of its kind, its batch sampler, the shard versions it reads."""

    key: tuple | None  # in _KEPT under this key; None: a loader for one pass only
    loader: DataLoader
    sampler: PassSampler
    versions: frozenset
    busy: bool = False
    used: bool = False


def _new_loader(dataset: ShardSamples, sampler: PassSampler, workers: int) -> DataLoader:
    # generator: DataLoader otherwise draws its workers' base seed from the trainer's global generator
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=_as_is,
                      persistent_workers=workers > 0, generator=torch.Generator(),
                      multiprocessing_context=worker_context() if workers else None,
                      worker_init_fn=_worker_init if workers else None)


_KEPT: dict[tuple, _Kept] = {}  # this process's loaders, by kind of stream
_DISOWNED: list[_Kept] = []  # a forked child's copies of its parent's loaders, never to be touched


def _loader_for(shards: Sequence[RunShard], transform: Transform, labels: bool, workers: int) -> _Kept:
    """The kept loader of this kind if it reads these shards' versions, else a new one over its shards and
    these (where their ids do not clash), kept in its place."""
    key = (labels, repr(transform), workers)
    versions = frozenset((s, s.index().stamp) for s in shards)
    kept = _KEPT.get(key)
    if kept is not None and not kept.busy and versions <= kept.versions:
        return kept
    transient = kept is not None and kept.busy  # another pass of this kind is being read
    wanted = sorted({s for s, _ in versions | (kept.versions if kept and not transient else set())},
                    key=lambda s: s.first_run_id)
    dataset = ShardSamples(shards if _overlapping(wanted) else wanted, transform, labels)
    sampler = PassSampler()
    new = _Kept(None if transient else key, _new_loader(dataset, sampler, workers), sampler,
                frozenset((s, i.stamp) for s, i in zip(dataset.shards, dataset.indexes, strict=True)))
    if not transient:
        _KEPT[key] = new  # the one it replaces is dropped: DataLoader shuts its workers down
    return new


def _passes(shards: Sequence[RunShard], transform: Transform, labels: bool, workers: int,
            ids: Sequence[np.ndarray], seeds: Sequence[np.ndarray] | None) -> Iterator[tuple]:
    """The batches (images packed, ids, labels) of one pass on the kept loader of its kind."""
    kept = _loader_for(shards, transform, labels, workers)
    kept.sampler.set_pass(ids, seeds)
    kept.busy = True
    try:
        try:
            batches = _start(kept.loader)
        except RuntimeError:  # a kept worker died since the last pass (DataLoader finds it here): new ones
            if not kept.used:
                raise
            kept.loader = _new_loader(kept.loader.dataset, kept.sampler, workers)
            batches = _start(kept.loader)
        kept.used = True
        for item in batches:
            if isinstance(item, _Failure):
                raise FerDistError(item.message)
            yield item
    except Exception:
        _KEPT.pop(kept.key, None)  # a failed pass: the next one starts on new workers
        raise
    finally:  # a consumer that stopped early keeps the loader: its next pass drops batches in flight
        kept.busy = False


def close_loader_workers() -> None:
    """End this process's kept loaders and their workers (the trainer's end; at exit, before
    multiprocessing's exit handler would wait for workers that ignore its SIGTERM)."""
    _KEPT.clear()
    gc.collect()  # a loader caught in a reference cycle is shut down now, not at some later collection


def _disown() -> None:
    """In a child forked from this process the loaders are the parent's: garbage collected there, they
    would tell the parent's workers to stop. Held, untouched, for good."""
    _DISOWNED.extend(_KEPT.values())
    _KEPT.clear()


atexit.register(close_loader_workers)
os.register_at_fork(after_in_child=_disown)


def _selected(shards: Sequence[RunShard], include: torch.Tensor | None) -> np.ndarray:
    """The run ids of the shards that `include` selects (None: all of them), ascending."""
    if include is None:
        include = torch.ones(max((s.first_run_id + s.count for s in shards), default=0), dtype=torch.bool)
    if include.dtype != torch.bool or include.dim() != 1:
        raise FerDistError(f"include must be a 1-D bool mask, got {include.dtype} {tuple(include.shape)}")
    return planning.selected_ids([(s.first_run_id, s.count) for s in shards], include.cpu().numpy())


class TrainStream:
    """One epoch of one rank: `steps` batches in all; iterating yields the `steps - skip` left."""

    def __init__(self, batches: functools.partial, targets: torch.Tensor, steps: int, skip: int) -> None:
        self.steps, self.skip = steps, skip
        self._batches, self._targets = batches, targets

    def __len__(self) -> int:
        return self.steps - self.skip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = 0
        for images, ids, _ in self._batches() if len(self) else ():
            ids = torch.tensor(ids, dtype=torch.long)
            yield unpack_batch(images), self._targets.index_select(0, ids.to(self._targets.device)), ids
            n += 1
        if n != len(self):  # the plan guarantees it; a shortfall would hang the other ranks' collectives
            raise RuntimeError(f"train stream yielded {n} batches, planned {len(self)}")


def train_loader(shards: list[RunShard], include: torch.Tensor, targets: torch.Tensor, *,
                 transform: Transform, global_batch: int, rank: int, world: int, num_workers: int, seed: int,
                 epoch: int, skip_batches: int = 0) -> TrainStream:
    """This rank's slice of every global batch of the epoch: (images, targets, ids), global_batch // world
    each; the global batches do not depend on world or num_workers."""
    selected = _selected(shards, include)
    if targets.dim() != 2 or targets.shape[0] != include.shape[0] or not targets.is_floating_point():
        raise FerDistError(f"targets: need a float table [{include.shape[0]}, K], not {tuple(targets.shape)}")
    steps, ids = planning.train_batches(selected, global_batch=global_batch, world=world, rank=rank,
                                        seed=seed, epoch=epoch, skip=skip_batches)
    seeds = planning.sample_seeds(seed, epoch, ids)
    batches = functools.partial(_passes, shards, transform, False, num_workers, ids, seeds)
    return TrainStream(batches, targets, steps, skip_batches)


class ExhaustiveStream:
    """One rank's share of an exhaustive pass: `samples` samples in `batches` batches (ranks may differ)."""

    def __init__(self, batches: functools.partial, ids: list[np.ndarray]) -> None:
        self.batches, self.samples = len(ids), sum(b.size for b in ids)
        self._batches = batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for images, ids, labels in self._batches() if self.samples else ():
            yield (unpack_batch(images), torch.tensor(labels, dtype=torch.long),
                   torch.tensor(ids, dtype=torch.long))


def exhaustive_loader(shards: list[RunShard], include: torch.Tensor | None, *, transform: Transform,
                      batch_size: int, rank: int, world: int, num_workers: int) -> ExhaustiveStream:
    """Every selected sample exactly once across ranks and workers, unaugmented: (images, labels, ids)."""
    selected = _selected(shards, include)
    ids = planning.exhaustive_batches(selected, batch_size=batch_size, world=world, rank=rank)
    return ExhaustiveStream(functools.partial(_passes, shards, transform, True, num_workers, ids, None), ids)
