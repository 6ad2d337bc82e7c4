"""Streams over shard directories: the training stream (the same global batches on any number of processes)
and the exhaustive pass (each selected id once across processes).

Stages, in open_clip's order:
  shard list (ShardSet: one id offset per directory)
  -> plan (fer_dist/data/plan.py, pure, in the main process: the epoch's order of the selected ids from
     (seed, epoch), this rank's slice of every global batch, each id's augmentation seed)
  -> batch sampler (PassSampler, set before each pass as DistributedSampler.set_epoch is)
  -> DataLoader workers: ShardSamples reads each id's allow-listed members through its shard's checked
     index (shardread.py), decodes the PNG, transforms it (torch's generator seeded per sample) and
     stacks the batch
  -> main process: each id's row of the target table (the table never travels to a worker).

One DataLoader per kind of stream (train or exhaustive, transform, worker count) is kept for the process's
life, with persistent workers; each pass sets its batch sampler and iterates it again. The loaders stay out
of accelerator.prepare(), which would split or dispatch them a second time.
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
from multiprocessing import resource_tracker
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from fer_dist.data import plan as planning
from fer_dist.data.augment import Transform
from fer_dist.data.integrity import checked_labels
from fer_dist.data.manifest import Manifest, read_manifest
from fer_dist.data.shardread import ShardIndex, decode_png, index_shard, parse_cls, read_samples
from fer_dist.errors import FerDistError


@dataclass(frozen=True)
class RunShard:
    """One shard as a run sees it: its samples hold run ids first_run_id .. first_run_id + count - 1."""

    path: Path
    count: int
    first_run_id: int
    labelled: int
    offset: int = 0  # the directory's id offset: tar key = run id - offset

    def index(self) -> ShardIndex:
        """The shard's member index (walked and checked once per process and file version, then cached)."""
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
    """A worker's FerDistError, passed as data: DataLoader would re-raise it wrapped in a traceback's text,
    where the main process raises it again as the one line it is."""

    message: str


Item = tuple[int, int | None]  # (run id, augmentation seed; None: nothing random)


class ShardSamples(Dataset):
    """Samples by run id from a list of shards (map-style); a batch is read, decoded, transformed, stacked."""

    def __init__(self, shards: Sequence[RunShard], transform: Transform, labels: bool) -> None:
        self.shards = sorted(set(shards), key=lambda s: s.first_run_id)
        if _overlapping(self.shards):
            raise FerDistError("shards with overlapping run ids cannot be read as one set")
        self.firsts = np.array([s.first_run_id for s in self.shards], dtype=np.int64)
        # Indexed here, in the main process, so that a bad shard fails naming it; a worker indexes the shard
        # again and refuses any other file version than this one (the one the label pass checked).
        self.stamps = [s.index().stamp for s in self.shards]
        self.transform, self.labels = transform, labels

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    def __getitem__(self, item: Item) -> tuple | _Failure:
        """A batch of the one sample `item`."""
        return self.__getitems__([item])

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
            index, shard = self._index(k), self.shards[k]
            read = read_samples(index, ids[rows] - shard.offset, fields)
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

    def _index(self, k: int) -> ShardIndex:
        index = self.shards[k].index()
        if index.stamp != self.stamps[k]:
            raise FerDistError(f"{index.path}: the shard changed while the run was reading it")
        return index


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


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}  # SIGINT: Ctrl-C reaches the whole group
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
    job). Started blocked, the server never takes one and its workers hold any until _worker_init ignores
    them; here it waits until the workers are started. The resource tracker is started first: its start
    unblocks SIGTERM in the calling thread (CPython bpo-33613).
    """
    if not loader.num_workers:
        return iter(loader)
    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker_init(worker_id: int) -> None:
    """DataLoader's worker_init_fn: stop signals ignored, the inherited heap frozen, the worker's life tied
    to the trainer's.

    DataLoader's own watchdog watches the worker's parent, here the fork server, which every worker's copy
    of its keep-alive descriptor keeps alive: a trainer killed outright would leave server and workers
    behind. multiprocessing.parent_process() is the trainer; its sentinel becomes readable when it dies.
    """
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
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
    """A DataLoader kept for every pass of its kind, its batch sampler, and the shard versions it reads."""

    loader: DataLoader
    sampler: PassSampler
    versions: frozenset
    busy: bool = False
    used: bool = False


def _new_loader(dataset: ShardSamples, sampler: PassSampler, num_workers: int) -> DataLoader:
    # generator: DataLoader otherwise draws its workers' base seed from the trainer's global generator
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=_as_is,
                      persistent_workers=num_workers > 0, generator=torch.Generator(),
                      multiprocessing_context=worker_context() if num_workers else None,
                      worker_init_fn=_worker_init if num_workers else None)


def _make(shards: Sequence[RunShard], transform: Transform, labels: bool, num_workers: int) -> _Kept:
    sampler, dataset = PassSampler(), ShardSamples(shards, transform, labels)
    versions = frozenset(zip(dataset.shards, dataset.stamps, strict=True))
    return _Kept(_new_loader(dataset, sampler, num_workers), sampler, versions)


_KEPT: dict[tuple, _Kept] = {}  # this process's loaders, by stream kind
_DISOWNED: list[_Kept] = []  # a forked child's copies of its parent's loaders, never to be touched


def _loader_for(shards: Sequence[RunShard], transform: Transform, labels: bool,
                num_workers: int) -> tuple[_Kept, bool]:
    """(the loader of this stream kind, whether it is kept after the pass). A kept loader whose shards hold
    these is reused; otherwise one over both shard lists (where their ids do not clash) replaces it."""
    key = (labels, repr(transform), num_workers)
    kept = _KEPT.get(key)
    versions = frozenset((s, s.index().stamp) for s in shards)
    if kept is not None and kept.busy:  # another pass of this kind is being read: a loader of its own
        return _make(shards, transform, labels, num_workers), False
    if kept is None or not versions <= kept.versions:
        both = {s for s, _ in versions | (kept.versions if kept is not None else frozenset())}
        wanted = sorted(both, key=lambda s: s.first_run_id)
        _KEPT.pop(key, None)  # its loader dropped: DataLoader shuts its workers down
        kept = _KEPT[key] = _make(shards if _overlapping(wanted) else wanted, transform, labels, num_workers)
    return kept, True


def _passes(shards: Sequence[RunShard], transform: Transform, labels: bool, num_workers: int,
            ids: Sequence[np.ndarray], seeds: Sequence[np.ndarray] | None) -> Iterator[tuple]:
    """The batches (images packed, ids, labels) of one pass on the kept loader of its kind."""
    kept, keep = _loader_for(shards, transform, labels, num_workers)
    kept.sampler.set_pass(ids, seeds)
    kept.busy = True
    try:
        try:
            batches = _start(kept.loader)
        except RuntimeError:  # a kept worker died since the last pass (DataLoader finds it here): new ones
            if not kept.used:
                raise
            kept.loader = _new_loader(kept.loader.dataset, kept.sampler, num_workers)
            batches = _start(kept.loader)
        kept.used = True
        for item in batches:
            if isinstance(item, _Failure):
                raise FerDistError(item.message)
            yield item
    except GeneratorExit:  # the consumer stopped early: DataLoader drops what is in flight at the next pass
        raise
    except BaseException:
        _drop(kept)  # a failed pass: the next one starts on new workers
        raise
    finally:
        kept.busy = False
        if not keep:
            _drop(kept)


def _drop(kept: _Kept) -> None:
    for key, value in list(_KEPT.items()):
        if value is kept:
            del _KEPT[key]


def close_loader_workers() -> None:
    """End this process's kept loaders and their workers (the trainer's end; at exit, before
    multiprocessing's exit handler would wait for workers that ignore its SIGTERM)."""
    _KEPT.clear()
    gc.collect()  # a loader caught in a reference cycle is shut down now, not at some later collection


def _disown() -> None:
    """In a child forked from this process: the loaders are the parent's; garbage collected here, they would
    tell the parent's workers to stop. Held, untouched, for good."""
    _DISOWNED.extend(_KEPT.values())
    _KEPT.clear()


atexit.register(close_loader_workers)
os.register_at_fork(after_in_child=_disown)


def _check_mask(include: torch.Tensor) -> np.ndarray:
    if include.dtype != torch.bool or include.dim() != 1:
        raise FerDistError(f"include must be a 1-D bool mask, got {include.dtype} {tuple(include.shape)}")
    return include.cpu().numpy()


def _selected(shards: Sequence[RunShard], mask: np.ndarray) -> np.ndarray:
    return planning.selected_ids([(s.first_run_id, s.count) for s in shards], mask)


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
) -> TrainStream:
    """This rank's slice of every global batch of the epoch: (images, targets, ids), global_batch // world
    each; the global batches do not depend on world or num_workers."""
    mask = _check_mask(include)
    if targets.dim() != 2 or targets.shape[0] != include.shape[0] or not targets.is_floating_point():
        raise FerDistError(f"targets: need a float table [{include.shape[0]}, K], not {tuple(targets.shape)}")
    selected = _selected(shards, mask)
    if not selected.size:
        raise FerDistError("train_loader: the include mask selects none of the given shards' samples")
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
    ids = planning.exhaustive_batches(_selected(shards, mask), batch_size=batch_size, world=world, rank=rank)
    return ExhaustiveStream(functools.partial(_passes, shards, transform, True, num_workers, ids, None), ids)
