"""The `shard` job: list a source, split it, align every face on all cores, write shards atomically.

Images are processed split by split in an order shuffled by the seed, in chunks shared between this
process (which also writes the shards) and `workers - 1` helper processes; results are written in order,
so ids and bytes do not depend on the number of workers. A corrupt image is skipped (listed in the
manifest) and takes no id.
Everything is written to `<out>.tmp-<pid>`, renamed to `<out>` once complete.
"""

from __future__ import annotations

import gc
import hashlib
import math
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from fer_dist import __version__
from fer_dist.classes import CLASSES
from fer_dist.data.faces import METHODS, align_face, to_channels
from fer_dist.data.manifest import MANIFEST, ImageSpec, Manifest, SplitInfo, write_manifest
from fer_dist.data.shards import SplitWriter, dump_json
from fer_dist.data.sources import (
    SOURCES,
    ImageReadError,
    Listing,
    Record,
    SourceOptions,
    get_source,
)
from fer_dist.data.sources.base import ImageFile, decode_image, read_file
from fer_dist.data.splits import DEFAULT_FRACTIONS, assign_folds, assign_splits, split_order
from fer_dist.errors import FerDistError
from fer_dist.files import write_errors
from fer_dist.progress import Progress

DEFAULT_SAMPLES_PER_SHARD = 1000  # the cap when --samples-per-shard is not given
MIN_SHARDS = 16  # fewer shards than this in a split: warn (GPUs x loader workers want several each)
MIN_AUTO_SHARD = 16  # smallest shard the default makes: tinier splits get fewer shards (and the warning)
FACE_OUTCOMES: dict[bool | None, str] = {True: "detected", False: "fallback", None: "not_attempted"}


@dataclass(frozen=True)
class PackSummary:
    """What `pack` wrote: the output folder, its manifest, warnings worth showing, and the time taken."""

    out: Path
    manifest: Manifest
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class ImageParams:
    """How every face is turned into PNG bytes (sent once to each worker)."""

    size: int
    channels: int
    align: str


# (png, detected, why the image was skipped, the size in bytes of the image file read, if one was)
Processed = tuple[bytes | None, bool | None, str | None, int | None]
Loads = list[Callable[[], np.ndarray]]


def _process_chunk(loads: Loads, params: ImageParams) -> list[Processed]:
    """_process_image of a run of loaders: one task for a helper process (one message each way per chunk).

    The run's files are read first, then decoded and encoded: alternating file reads with image coding made
    each FER2013 face 1.5-3 us slower (timed side by side in one process; BENCHMARKS.md).
    """
    files = [_read_ahead(load) for load in loads]
    return [_process_image(load, data, params) for load, data in zip(loads, files, strict=True)]


def _read_ahead(load: Callable[[], np.ndarray]) -> bytes | ImageReadError | None:
    """An ImageFile loader's file bytes, or why they cannot be read; None for other loaders (they read when
    called)."""
    if not isinstance(load, ImageFile):
        return None
    try:
        return read_file(load.path)
    except ImageReadError as exc:
        return exc


def _process_image(load: Callable[[], np.ndarray], data: bytes | ImageReadError | None,
                   params: ImageParams) -> Processed:
    """Load one face (from what _read_ahead gave for its loader), convert its channels, align it and encode it
    as PNG; a corrupt file gives a reason."""
    file_size = None
    try:
        if data is None:
            image = load()
        elif isinstance(data, ImageReadError):
            raise data
        else:  # an ImageFile's bytes: their size comes back with the face, for the source fingerprint
            file_size = len(data)
            image = decode_image(data, load.path)  # type: ignore[attr-defined]
    except ImageReadError as exc:
        return None, None, exc.reason, file_size
    face = align_face(to_channels(image, params.channels), params.size, params.align)
    pixels = face.image
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR: the PNG then holds true RGB
    ok, png = cv2.imencode(".png", pixels)
    if not ok:
        raise RuntimeError(f"cv2.imencode failed on a {pixels.shape} image")
    return png.tobytes(), face.detected, None, file_size


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe
    # A corrupt file is reported once, as a skipped entry; OpenCV would also log it to stderr.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


# Images per task (at most; small jobs get smaller chunks so that every process gets several). The pool's
# threads in this process (pickling, results) cost ~4 us per image with 256, ~9 with 64.
CHUNK = 256
DEPTH = 3  # tasks queued or running per helper, so a helper never waits for this process to hand out work


class _Processor:
    """Maps loaders to Processed results in order, on `workers` processes: this one and workers - 1 helpers.

    This process writes the results; it takes a chunk of image work itself whenever the next chunk to write
    is still being worked on and nothing else is ready, and does all of it until a helper has started (spawn
    and importing OpenCV take a second or so, in which this process is not idle). With one worker there is no
    pool at all. Results do not depend on which process made them.
    """

    def __init__(self, workers: int) -> None:
        self.helpers = workers - 1
        self.pool: ProcessPoolExecutor | None = None
        self._started: list[Future] = []  # one trivial task per helper: done once the helper is up
        self._up = False

    def __enter__(self) -> _Processor:
        # This process does image work too: quiet and single-threaded OpenCV, as in the helpers, until exit.
        self._log_level, self._threads = cv2.utils.logging.getLogLevel(), cv2.getNumThreads()
        _init_worker()
        if self.helpers == 0:
            return self
        # spawn, not fork: forking a parent that runs threads (OpenCV's, rich's, torch's) can deadlock the
        # child. An executor, not multiprocessing.Pool: a worker that dies (say, a caller's unguarded
        # __main__ re-run under spawn) raises BrokenProcessPool instead of being respawned forever.
        ctx = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(self.helpers, mp_context=ctx, initializer=_init_worker)
        # Start every helper now: they import OpenCV while this process lists the source. They do no linear
        # algebra: without this, numpy's OpenBLAS starts a thread per core in each, and those threads spin
        # for a while (0.2 s of CPU per helper, taken from this process on a small machine).
        with _environ(OPENBLAS_NUM_THREADS="1"):
            self._started = [self.pool.submit(os.getpid) for _ in range(self.helpers)]
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        cv2.utils.logging.setLogLevel(self._log_level)
        cv2.setNumThreads(self._threads)
        if self.pool is not None:
            # After an error (bad input found while listing, Ctrl-C), or when this process did all the work
            # before any helper was up (a small job), do not wait for helpers still importing: they exit on
            # their own when they see the shutdown.
            self.pool.shutdown(wait=exc_type is None and self._helpers_up(), cancel_futures=True)

    def map(self, loads: Loads, params: ImageParams) -> Iterator[Processed]:
        """_process_image of every loader, in the order of `loads`."""
        size = max(1, min(CHUNK, len(loads) // (8 * (self.helpers + 1))))
        chunks = [loads[i:i + size] for i in range(0, len(loads), size)]
        if self.pool is None:
            # The same chunks as with helpers: image work and writing alternate chunk by chunk.
            return (result for chunk in chunks for result in _process_chunk(chunk, params))
        return self._shared(chunks, params)

    def _shared(self, chunks: list[Loads], params: ImageParams) -> Iterator[Processed]:
        """The chunks' results in order, the work shared between this process and the helpers."""
        assert self.pool is not None
        running: dict[int, Future] = {}  # chunks given to helpers, until their turn to be written
        ahead: dict[int, list[Processed]] = {}  # chunks done (here or by a helper), until their turn
        given = 0  # chunks before this index are given out (to a helper, or done here)
        for k in range(len(chunks)):  # every chunk before k is written, so k <= given
            while k not in ahead:
                if given < len(chunks) and self._helpers_up():  # keep each helper's queue full
                    busy = sum(not f.done() for f in running.values())
                    while given < len(chunks) and busy < DEPTH * self.helpers:
                        running[given] = self.pool.submit(_process_chunk, chunks[given], params)
                        given, busy = given + 1, busy + 1
                future = running.get(k)
                # Wait for chunk k when it is ready, when nothing is left to do here, or when later chunks are
                # ready (the helpers are ahead: writing is the bottleneck, image work here would slow it).
                if future is not None and (future.done() or given == len(chunks)
                                           or any(f.done() for f in running.values())):
                    ahead[k] = running.pop(k).result()
                else:  # chunk k is not given out yet, or every helper is busy: do the next chunk here
                    ahead[given] = _process_chunk(chunks[given], params)
                    given += 1
            yield from ahead.pop(k)

    def _helpers_up(self) -> bool:
        """Whether a helper has started (a failed start shows as BrokenProcessPool at the next submit)."""
        self._up = self._up or any(f.done() for f in self._started)
        return self._up


@contextmanager
def _environ(**defaults: str) -> Iterator[None]:
    """Environment variables set where the user has not set them (for processes started meanwhile)."""
    added = [name for name in defaults if name not in os.environ]
    os.environ.update({name: defaults[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the job, then as it was.

    The listing holds several objects per image and every collection of the oldest generation walks them
    all: 2.8 us per image on FER2013, 0.8 with the collector paused (one collection after). The job makes no
    reference cycles to speak of.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def usable_cores() -> int:
    """The cores this process may run on (a SLURM job's share, not the whole node's os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def pack(
    dataset: str,
    src: Sequence[Path],
    out: Path,
    *,
    align: str | None = None,
    size: int = 48,
    channels: int = 1,
    split: Sequence[float] = DEFAULT_FRACTIONS,
    folds: int | None = None,
    seed: int = 0,
    samples_per_shard: int | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    options: SourceOptions | None = None,
    progress: bool = True,
) -> PackSummary:
    """Shard a data set into `out`: `<split>-NNNNNN.tar` files and `manifest.json`, written atomically."""
    started = time.perf_counter()
    out, src = Path(out), [Path(p) for p in src]
    options = options or SourceOptions()
    _check_args(dataset, src, out, overwrite, size, channels, folds, samples_per_shard, workers, align)
    # Workers start before listing: they import OpenCV while this process walks the data set.
    with _gc_paused(), _Processor(workers or usable_cores()) as processor:
        listing = get_source(dataset)(src, options)
        where = src[0] if src else dataset
        if not listing.records:
            raise FerDistError(f"{where}: no images found")
        params = {"align": align or listing.default_align, "size": size, "channels": channels,
                  "split": list(split), "folds": folds, "seed": seed, "samples_per_shard": samples_per_shard,
                  "options": _jsonable(asdict(options))}
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        try:
            with write_errors(f"{out}: cannot write the shards (an earlier folder there is intact)"):
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp.mkdir()
                manifest, file_sizes = _build(tmp, dataset, listing, params, processor, progress)
                if manifest.num_ids == 0:
                    raise FerDistError(f"{where}: none of the {len(listing.records)} images could be read")
                source = source_fingerprint(dataset, src, listing, options, file_sizes)
                manifest = replace(manifest, source=source)
                write_manifest(tmp, manifest)
                _install(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return PackSummary(out, manifest, pack_warnings(manifest), time.perf_counter() - started)


def pack_warnings(manifest: Manifest) -> list[str]:
    """What a new shard folder lacks that a training run will want to know now, not at the first epoch."""
    warnings = []
    if "val" not in manifest.splits:
        why = " (no PublicTest rows or files)" if manifest.dataset == "fer2013" else ""
        warnings.append(f"no val split{why}, only {', '.join(manifest.splits)}: training needs data.val "
                        "to name a split of this or another shard folder")
    # Only a split large enough for MIN_SHARDS default-sized shards is worth the warning: a smaller one is
    # read in milliseconds whoever shares it, and its few shards are the default's own choice.
    warnings += [f"split {name!r} has {len(s.shards)} shard(s), fewer than {MIN_SHARDS}: loader workers "
                 "will share shards (a smaller --samples-per-shard gives more)"
                 for name, s in manifest.splits.items()
                 if len(s.shards) < MIN_SHARDS and s.count >= MIN_SHARDS * MIN_AUTO_SHARD]
    return warnings


def write_order(records: Sequence[Record], splits: Sequence[str], seed: int) -> list[int]:
    """The records' indices in the order they get ids: split by split (train, val, test, others), each
    split in an order shuffled by the seed.

    In key order a shard would hold one class (FER2013's folders) or one subject, and a rank streaming a
    contiguous run of shards would see batches of one class. The shuffle is a hash of (seed, key): the same
    whatever the number of workers or the order the source listed the records in.
    """
    rank = {name: i for i, name in enumerate(split_order(splits))}
    sort_keys = [(rank[s], _shuffle_key(seed, r.key)) for s, r in zip(splits, records, strict=True)]
    return sorted(range(len(records)), key=sort_keys.__getitem__)


def _shuffle_key(seed: int, key: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()


def _build(tmp: Path, dataset: str, listing: Listing, params: dict, processor: _Processor,
           progress: bool) -> tuple[Manifest, dict[str, int]]:
    """Split, process and write every record into `tmp`: its manifest (the source fingerprint left empty),
    and the sizes of the image files read, by path."""
    records = listing.records
    splits = assign_splits(records, params["split"], params["seed"])
    fold_ids = assign_folds(records, params["folds"], params["seed"]) if params["folds"] else None
    order = write_order(records, splits, params["seed"])
    writer = _ShardsWriter(tmp, _shard_sizes(Counter(splits), params["samples_per_shard"]))
    image = ImageParams(params["size"], params["channels"], params["align"])
    results = processor.map([records[i].load for i in order], image)
    try:
        total = len(order)
        with Progress(enabled=progress).task(f"shard {dataset}", total=total) as bar:
            shown = 0
            for n, (i, result) in enumerate(zip(order, results, strict=True), start=1):
                writer.add(records[i], splits[i], None if fold_ids is None else fold_ids[i], result)
                if n % 256 == 0 or n == total:  # a bar update costs more than writing a sample
                    bar.advance(n - shown)
                    shown = n
        split_infos = writer.close()
    finally:
        writer.abort()
    return Manifest(
        dataset=dataset, classes=CLASSES, num_ids=sum(s.count for s in split_infos.values()),
        image=ImageSpec(params["size"], params["channels"]), splits=split_infos, folds=params["folds"],
        params=params, source={}, faces={name: writer.faces[name] for name in FACE_OUTCOMES.values()},
        skipped=[{"path": p, "reason": r} for p, r in sorted([*listing.skipped, *writer.failed])],
        created_by=f"fer-dist {__version__}",
    ), writer.file_sizes


def _check_args(dataset: str, src: list[Path], out: Path, overwrite: bool, size: int, channels: int,
                folds: int | None, samples_per_shard: int | None, workers: int | None,
                align: str | None) -> None:
    """Every check that needs no listing, so bad input fails before any work."""
    spec = SOURCES.get(dataset)
    if spec is None:
        raise FerDistError(f"--dataset: unknown data set {dataset!r} (known: {', '.join(SOURCES)})")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FerDistError(f"{out}: exists; pass --overwrite to replace it")
        if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
            # --overwrite replaces shard folders only: a typo must not delete someone's home directory.
            raise FerDistError(f"{out}: exists and is not a shard folder (no {MANIFEST}); not replacing it")
    if spec.needs_src and not src:
        raise FerDistError(f"--src: the {dataset} data set needs --src PATH")
    for path in src:
        if not path.exists():
            raise FerDistError(f"{path}: no such file or folder (--src)")
    checks = [
        (align is None or align in METHODS, f"--align: {align!r} is not one of {', '.join(METHODS)}"),
        (size >= 8, f"--size: {size} pixels is too small (at least 8)"),
        (channels in (1, 3), f"--channels: {channels} is not 1 (grey) or 3 (RGB)"),
        (folds is None or folds >= 2, f"--folds: {folds} folds; cross-validation needs at least 2"),
        (samples_per_shard is None or samples_per_shard >= 1,
         f"--samples-per-shard: must be at least 1, got {samples_per_shard}"),
        (workers is None or workers >= 1, f"--workers: must be at least 1, got {workers}"),
    ]
    for ok, message in checks:
        if not ok:
            raise FerDistError(message)


def _shard_sizes(counts: Counter, samples_per_shard: int | None) -> dict[str, int]:
    """Samples per shard for each split: as asked, else MIN_SHARDS shards capped at the default size."""
    if samples_per_shard is not None:
        return {name: samples_per_shard for name in counts}
    # Small splits get small shards so that loader workers still find several shards to share out.
    return {name: min(DEFAULT_SAMPLES_PER_SHARD, max(MIN_AUTO_SHARD, math.ceil(n / MIN_SHARDS)))
            for name, n in counts.items()}


class _ShardsWriter:
    """Gives processed faces consecutive ids (skipped images take none) and routes them to their split."""

    def __init__(self, directory: Path, per_shard: dict[str, int]) -> None:
        self.directory, self.per_shard = directory, per_shard
        self.splits: dict[str, SplitWriter] = {}
        self.faces: Counter = Counter()
        self.failed: list[tuple[str, str]] = []
        self.file_sizes: dict[str, int] = {}  # image files read, by path: their sizes for the fingerprint
        self.next_id = 0

    def add(self, record: Record, split: str, fold: int | None, result: Processed) -> None:
        """Write one processed record, or note why it was skipped."""
        png, detected, reason, file_size = result
        if file_size is not None:
            self.file_sizes[record.load.path] = file_size  # type: ignore[attr-defined] -- an ImageFile
        if png is None:
            self.failed.append((str(record.meta.get("path", record.key)), f"unreadable: {reason}"))
            return
        writer = self.splits.get(split)
        if writer is None:
            writer = self.splits[split] = SplitWriter(self.directory, split, self.per_shard[split])
        outcome = FACE_OUTCOMES[detected]
        meta = {**record.meta, "key": record.key, "aligned": outcome}
        if fold is not None:
            meta["fold"] = fold
        writer.add(self.next_id, record.label, png, meta)
        self.faces[outcome] += 1
        self.next_id += 1

    def close(self) -> dict[str, SplitInfo]:
        """Finish every split's last shard; split infos in id order."""
        return {name: writer.close() for name, writer in self.splits.items()}

    def abort(self) -> None:
        """Close any shard file still open (after an error; a no-op after close)."""
        for writer in self.splits.values():
            writer.abort()


def source_fingerprint(dataset: str, src: Sequence[Path], listing: Listing, options: SourceOptions,
                       file_sizes: Mapping[str, int] | None = None) -> dict:
    """sha256 over the data set name, the source options and every input file's relative path and size.

    `file_sizes`: sizes already known, by path (the image files the job read), so that only the other files
    are stat'ed: a stat per file costs ~3 us, as much as the rest of the fingerprint.
    """
    h = hashlib.sha256(dump_json({"dataset": dataset, "options": _jsonable(asdict(options))}))
    known = file_sizes or {}
    paths = [os.fspath(f) for f in listing.files]
    sizes = [known[p] if p in known else _file_size(p) for p in paths]
    entries = sorted(zip(_relative_paths(paths, src), sizes, strict=True))
    h.update("".join([f"{rel}\0{size}\n" for rel, size in entries]).encode())  # as one update per file
    return {"fingerprint": f"sha256:{h.hexdigest()}", "files": len(listing.files)}


def _file_size(path: str) -> int:
    """A file's size; -1 for a file gone or unreadable since listing (the job lists it as skipped)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _relative_paths(paths: list[str], src: Sequence[Path]) -> list[str]:
    """Each path relative to its --src: the fingerprint must not depend on where the data lives."""
    # Strings, not Paths: this runs once per file, and pathlib costs as much as a face's PNG encoding.
    bases = [os.path.join(root if root.is_dir() else root.parent, "") for root in src]
    return [_relative(p, bases) for p in paths]


def _relative(path: str, bases: list[str]) -> str:
    """A file's path relative to its --src (numbered when there are several)."""
    for n, base in enumerate(bases):
        if path.startswith(base):
            rel = path[len(base) :].replace(os.sep, "/")
            return f"{n}/{rel}" if len(bases) > 1 else rel
    return os.path.basename(path)


def _jsonable(value: object) -> object:
    """Tuples as lists, recursively, so params read back as they were written."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _install(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old output is renamed away first and deleted last."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
