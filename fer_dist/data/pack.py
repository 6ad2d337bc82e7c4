"""The `shard` job: list a source, split it, align every face on all cores, write shards atomically.

Images are processed split by split in an order shuffled by the seed, in chunks shared between this
process (which also writes the shards) and `workers - 1` helper processes (imagework.py); results are
written in order, so ids and bytes do not depend on the number of workers. A corrupt image is skipped
(listed in the manifest) and takes no id.
Everything is written to `<out>.tmp-<pid>`, renamed to `<out>` once complete.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fer_dist import __version__
from fer_dist.classes import CLASSES
from fer_dist.data.faces import METHODS
from fer_dist.data.imagework import ImageParams, Processed, Processor
from fer_dist.data.manifest import ImageSpec, Manifest, SplitInfo, write_manifest
from fer_dist.data.shards import SplitWriter, dump_json
from fer_dist.data.sources import (
    Listing,
    Record,
    SourceOptions,
    get_source,
    source_spec,
)
from fer_dist.data.splits import DEFAULT_FRACTIONS, assign_folds, assign_splits, split_order
from fer_dist.errors import FerDistError
from fer_dist.files import swap_in, write_errors
from fer_dist.outputs import check_folder
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


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the job, then as it was.

    The listing holds several objects per image and every collection of the oldest generation walks them
    all (docs/design/shard-job.md has the cost per image). The job makes no reference cycles to speak of.
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
    with _gc_paused(), Processor(workers or usable_cores()) as processor:
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
                _install(tmp, out, overwrite)
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


def _build(tmp: Path, dataset: str, listing: Listing, params: dict, processor: Processor,
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
    spec = source_spec(dataset)
    # --overwrite replaces an earlier shard folder only (its manifest lists every file in it): a typo must
    # not delete someone's home directory, nor a file someone put beside the shards.
    check_folder(out, "shard", overwrite=overwrite, what="shard folder")
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
    are stat'ed: a stat per file costs as much as the rest of the fingerprint.
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


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished folder into place; an old output is renamed away first and deleted last."""
    check_folder(out, "shard", overwrite=overwrite, what="shard folder")  # again: it may have changed
    swap_in(tmp, out)
