"""Streams over shard directories: training (the same global batches on any number of processes and
loader workers) and the exhaustive pass (each selected id once across processes).

Stages: shard list (runset.py: one id offset per directory) -> plan (plan.py, pure, in the main process)
-> batch sampler (PassSampler: this rank's slice of each global batch, each id's augmentation seed) ->
DataLoader workers (ShardSamples: allow-listed members read through each shard's checked index,
PNG decoded, transformed, stacked) -> the main process pairs each id with its row of the target table,
which never travels to a worker. A run owns its `Loaders` (built by `run_state.build_run`, closed by
`train.main`): one DataLoader per kind of stream, its workers persistent; each pass sets its batch sampler
and iterates it again. `train_loader` and `exhaustive_loader` read one pass on a loader of their own whose
workers end with the pass. The loaders stay out of accelerator.prepare(), which would split or dispatch
them a second time.
"""

from __future__ import annotations

import functools
import gc
import multiprocessing
import os
import signal
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
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
Item = tuple[int, int | None]  # (run id, augmentation seed; None: nothing random)


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


class _Failure(str):
    """A worker's FerDistError message, returned as data: DataLoader would re-raise it inside a traceback."""


class ShardSamples(Dataset):
    """Samples by run id from a list of shards (map-style); a batch is read, decoded, transformed, stacked."""

    def __init__(self, shards: Sequence[RunShard], transform: Transform, labels: bool) -> None:
        self.shards = sorted(set(shards), key=lambda s: s.first_run_id)
        # Indexed here, in the main process (a bad shard fails here, naming itself), and sent to the workers
        # with the dataset: read_samples refuses a file changed since, unlike the one the label pass checked.
        self.indexes = [s.index() for s in self.shards]
        for a, b in zip(self.shards[:-1], self.shards[1:], strict=True):
            if a.first_run_id + a.count > b.first_run_id:
                raise FerDistError(f"{a.path} and {b.path}: overlapping run ids (their manifest's counts)")
        self.firsts = np.array([s.first_run_id for s in self.shards], dtype=np.int64)
        self.transform, self.labels = transform, labels

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


class PassSampler(Sampler):
    """This rank's batches of the current pass, lists of (run id, seed): set before each pass (as
    DistributedSampler.set_epoch is), so one DataLoader and its workers serve every pass of its kind."""

    def __init__(self) -> None:
        self.batches: list[list[Item]] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[Item]]:
        return iter(self.batches)  # this pass's, even if the next one is set meanwhile


# ---------------------------------------------------------------------------------------------------------
# loader workers: where they start from, their signals, their end with the trainer

# Each worker re-runs the main module, which its fork server preloaded (worker_context): runpy warns that
# the module is already imported, by design here, once per worker.
warnings.filterwarnings("ignore", message=r".*found in sys\.modules after import of package",
                        category=RuntimeWarning, module="runpy")


@functools.cache
def worker_context() -> multiprocessing.context.BaseContext:
    """The one place the workers' start method is chosen: a fork server, not a fork of the trainer.

    Forking a process with other threads (gloo's, queue feeders) can leave the child stuck forever in
    CPython before 3.11.8 (gh-112275; this project runs on 3.11.7 too), and 3.12 deprecates it; spawn would
    import torch again in every worker. The server imports the stream's and the trainer's modules once, so
    a worker starts without importing them."""
    ctx = multiprocessing.get_context("forkserver")
    main = getattr(sys.modules["__main__"], "__spec__", None)
    preload = [__name__, "fer_dist.train"]
    ctx.set_forkserver_preload(preload + [main.name] if main is not None and main.name not in preload
                               else preload)
    return ctx


def _start(loader: DataLoader) -> Iterator:
    """iter(loader), with the stop signals blocked while it may start the workers and their fork server:
    a stop is the trainer's to handle (SLURM signals every process of the job). Started blocked, the
    resource tracker and the fork server never take one, the workers hold any until _worker_init."""
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


class _Loader:
    """One DataLoader over a ShardSamples, its batch sampler set before each pass. Persistent: the same
    workers read every pass (DataLoader's reset drops the batches in flight of a pass left unfinished);
    else each pass starts its workers and they end with it."""

    def __init__(self, shards: Sequence[RunShard], transform: Transform, labels: bool, workers: int,
                 persistent: bool) -> None:
        self.shards, self.sampler = frozenset(shards), PassSampler()
        # generator: DataLoader otherwise draws its workers' base seed from the trainer's global generator
        self.loader: DataLoader | None = DataLoader(
            ShardSamples(shards, transform, labels), batch_sampler=self.sampler, num_workers=workers,
            collate_fn=_as_is, persistent_workers=persistent and workers > 0, generator=torch.Generator(),
            multiprocessing_context=worker_context() if workers else None,
            worker_init_fn=_worker_init if workers else None)
        self._reading: weakref.ref | None = None  # the pass being read: close() ends it

    def read(self, batches: list[list[Item]]) -> Iterator[tuple]:
        """The batches (images packed, ids, labels) of a pass; one at a time (a DataLoader's one iterator)."""
        if self._reading is not None and self._reading() is not None:
            raise RuntimeError("a pass of this loader is still being read: finish or close it first")
        if self.loader is None:
            raise RuntimeError("this loader is closed")
        self.sampler.batches = batches
        reading = self._read(self.loader)
        self._reading = weakref.ref(reading)
        return reading

    def _read(self, loader: DataLoader) -> Iterator[tuple]:
        try:
            for item in _start(loader):
                if isinstance(item, _Failure):
                    raise FerDistError(item)
                yield item
        finally:
            self._reading = None

    def close(self) -> None:
        """End the pass being read, then the loader: DataLoader shuts its workers down once dropped. A pass
        left suspended (an error's traceback holds it) would keep them, and the process would hang at exit
        in multiprocessing's join of workers that ignore its SIGTERM."""
        reading = self._reading() if self._reading is not None else None
        if reading is not None:
            reading.close()
        self.loader = None


class Stream:
    """One rank's batches of one pass: `steps` in all, `len()` of them left to read (fewer in a resumed
    epoch); each (images, targets, ids) given a target table, else (images, labels, ids)."""

    def __init__(self, loader: _Loader, ids: Sequence[np.ndarray], seeds: np.ndarray | None,
                 targets: torch.Tensor | None, steps: int) -> None:
        self.steps = steps
        self._loader, self._targets = loader, targets
        rows = seeds.tolist() if seeds is not None else [[None] * b.size for b in ids]
        self._batches = [list(zip(b.tolist(), r, strict=True)) for b, r in zip(ids, rows, strict=True)]

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = 0
        for images, ids, labels in self._loader.read(self._batches) if self._batches else ():
            ids = torch.tensor(ids, dtype=torch.long)
            second = (torch.tensor(labels, dtype=torch.long) if self._targets is None
                      else self._targets.index_select(0, ids.to(self._targets.device)))
            yield unpack_batch(images), second, ids
            n += 1
        if n != len(self):  # the plan guarantees it; a shortfall would hang the other ranks' collectives
            raise RuntimeError(f"stream yielded {n} batches, planned {len(self)}")


class Loaders:
    """One DataLoader per kind of stream over a set of shards: the training epochs (given a `train`
    transform) and the exhaustive passes (given an `exhaustive` one: prediction, validation, test). A run
    owns its Loaders (`run_state.build_run`; `train.main` closes them). Persistent: a loader's workers start
    at its first pass and read every later one. Close them (`close()`, or a `with` block) before the
    process exits."""

    def __init__(self, shards: Sequence[RunShard], *, num_workers: int, train: Transform | None = None,
                 exhaustive: Transform | None = None, persistent: bool = True) -> None:
        self._train, self._exhaustive = (
            _Loader(shards, tf, labels, num_workers, persistent) if tf is not None else None
            for tf, labels in ((train, False), (exhaustive, True)))

    def train(self, shards: Sequence[RunShard], include: torch.Tensor, targets: torch.Tensor, *,
              global_batch: int, rank: int, world: int, seed: int, epoch: int,
              skip_batches: int = 0) -> Stream:
        """This rank's slice of every global batch of the epoch: (images, targets, ids), global_batch // world
        each; the global batches do not depend on world or num_workers."""
        selected = _selected(self._train, shards, include)
        if targets.dim() != 2 or targets.shape[0] != include.shape[0] or not targets.is_floating_point():
            raise FerDistError(f"targets: need a float table [{include.shape[0]}, K], not "
                               f"{tuple(targets.shape)}")
        steps, ids = planning.train_batches(selected, global_batch=global_batch, world=world, rank=rank,
                                            seed=seed, epoch=epoch, skip=skip_batches)
        return Stream(self._train, ids, planning.sample_seeds(seed, epoch, ids), targets, steps)

    def exhaustive(self, shards: Sequence[RunShard], include: torch.Tensor | None, *, batch_size: int,
                   rank: int, world: int) -> Stream:
        """Every selected sample exactly once across ranks and workers, unaugmented: (images, labels, ids);
        ranks may take different numbers of batches."""
        selected = _selected(self._exhaustive, shards, include)
        ids = planning.exhaustive_batches(selected, batch_size=batch_size, world=world, rank=rank)
        return Stream(self._exhaustive, ids, None, None, len(ids))

    def close(self) -> None:
        """End both loaders and their workers, also in the middle of a pass."""
        for loader in (self._train, self._exhaustive):
            if loader is not None:
                loader.close()
        gc.collect()  # a loader caught in a reference cycle is shut down now, not at some later collection

    def __enter__(self) -> Loaders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _selected(loader: _Loader | None, shards: Sequence[RunShard], include: torch.Tensor | None) -> np.ndarray:
    """The run ids of the shards that `include` selects (None: all of them), ascending."""
    if loader is None or not loader.shards.issuperset(shards):
        raise FerDistError("a stream was asked of loaders not made for its kind or its shards")
    if include is None:
        include = torch.ones(max((s.first_run_id + s.count for s in shards), default=0), dtype=torch.bool)
    if include.dtype != torch.bool or include.dim() != 1:
        raise FerDistError(f"include must be a 1-D bool mask, got {include.dtype} {tuple(include.shape)}")
    return planning.selected_ids([(s.first_run_id, s.count) for s in shards], include.cpu().numpy())


def train_loader(shards: Sequence[RunShard], include: torch.Tensor, targets: torch.Tensor, *,
                 transform: Transform, num_workers: int, **plan: int) -> Stream:
    """One epoch (`Loaders.train`; `plan`: global_batch, rank, world, seed, epoch, skip_batches) on a loader
    of its own, whose workers end with the pass."""
    return Loaders(shards, num_workers=num_workers, train=transform, persistent=False).train(
        shards, include, targets, **plan)


def exhaustive_loader(shards: Sequence[RunShard], include: torch.Tensor | None, *, transform: Transform,
                      num_workers: int, **plan: int) -> Stream:
    """One exhaustive pass (`Loaders.exhaustive`; `plan`: batch_size, rank, world) on a loader of its own,
    whose workers end with the pass."""
    return Loaders(shards, num_workers=num_workers, exhaustive=transform, persistent=False).exhaustive(
        shards, include, **plan)
