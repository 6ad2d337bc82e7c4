"""A run's id space, its masks and its checked labels: one module from shard folders to X_l, X_u, val, test.

The id space (`ShardSet`): a run may combine several shard directories (FER2013 labelled, CK+ unlabelled
...); directory k's ids are offset by the earlier ones' num_ids, and the offsets are saved in checkpoints and
checked on resume. Each shard holds a known contiguous id range (its manifest entry), so what a selection
mask takes from each shard is known before anything is read (fer_dist/data/plan.py plans on it).

The checked labels (`checked_labels`): every sample a run uses is checked once against its manifest digest,
before the first step. The ranks of a launch split that pass (each checks every world-th shard, and
`dist.label_pass` reduces the parts), so the ranks together read each shard once, not once per rank. The
manifest keeps a CRC-32 per sample over its tar bytes: its members' headers, data and padding, one run of
bytes in the file (`shards.sample_digest`). The label pass that every run makes anyway reads each shard once
and checks every sample's digest over that run as it lies on disk (its bounds from the shard index), so a
flipped byte anywhere in a sample - a header, a `.cls` member that would be a silently wrong label, a `.json`
member that would be a wrong fold - is found. The streams then read the same file version without checking
again: `read_samples` refuses a shard whose size or mtime changed since it was indexed, so the hot read path
pays nothing. `on_error` decides what a damaged sample does: `raise` (the default) stops with a FerDistError
naming the shard and the sample; `skip` leaves the sample out of every part of the run (a shard that cannot
even be indexed: all its samples) and reports each one, for the trainer to count in its log.

The masks (`load_run_data`): which ids are X_l, X_u, validation and test, over that one id space.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fer_dist.config import DataConfig, ShardsRef
from fer_dist.data.manifest import DIGEST_CHARS, Manifest, ShardInfo, read_manifest
from fer_dist.data.shardread import ALLOWED, ShardIndex, index_shard, parse_cls, read_samples, shard_bytes
from fer_dist.errors import FerDistError
from fer_dist.hashing import GOLDEN, mix64
from fer_dist.launchenv import CHECKED_ENV

OnError = Literal["raise", "skip"]

# ---------------------------------------------------------------------------------------------------------
# the id space

@dataclass(frozen=True)
class RunShard:
    """One shard as a run sees it: its samples hold run ids first_run_id .. first_run_id + count - 1."""

    path: Path
    count: int
    first_run_id: int
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

    def infos(self, entry: int) -> Iterator[tuple[Path, ShardInfo, int]]:
        """(file, manifest entry, directory's id offset) of each shard of entry `entry`: its splits in the
        order named, each in id order."""
        directory, splits = self.entries[entry]
        manifest, offset = self.manifests[directory], self._offsets[directory]
        for split in splits:
            if split not in manifest.splits:
                raise FerDistError(f"{directory}: no split {split!r} (it has {', '.join(manifest.splits)})")
            for info in manifest.splits[split].shards:
                path = directory / info.file
                if not path.is_file():
                    raise FerDistError(f"{path}: shard listed in the manifest is missing")
                yield path, info, offset

    def shards(self, entry: int) -> list[RunShard]:
        """The shards of entry `entry` as the streams read them."""
        return [RunShard(path, s.count, offset + s.first_id, offset) for path, s, offset in self.infos(entry)]


# ---------------------------------------------------------------------------------------------------------
# the checked labels

@dataclass
class CheckedLabels:
    """What the label pass found: every id's class (-1: unlabelled or damaged), the damaged ids, why."""

    labels: torch.Tensor                           # [num_ids] long
    damaged: torch.Tensor                          # [num_ids] bool: left out under on_error=skip
    covered: torch.Tensor                          # [num_ids] bool: the ids of the shards checked here
    problems: list[str] = field(default_factory=list)  # one line per damaged sample or shard


def _sample_problem(path: Path, index: ShardIndex, row: int, data: bytes, digest: str) -> str | None:
    """Why one sample is damaged, or None: a member missing, or its bytes unlike the manifest's digest."""
    key = index.first_key + row
    lacking = [f".{ext}" for ext in ALLOWED if index.at[ext][row] < 0]
    if lacking:
        return f"{path}: sample {key:08d} lacks its {', '.join(lacking)} member"
    start, end = index.span[row].tolist()
    if f"{zlib.crc32(memoryview(data)[start:end]):08x}" != digest:
        return f"{path}: sample {key:08d} differs from the manifest's digest (damaged after sharding)"
    return None


def _check_shard(path: Path, info: ShardInfo, offset: int, out: CheckedLabels, on_error: OnError) -> None:
    """One shard's samples into `out` (labels at run id = offset + key), every digest checked."""
    def fail(message: str, ids: Iterable[int]) -> None:
        if on_error == "raise":
            raise FerDistError(message)
        out.problems.append(message)
        for sid in ids:
            out.damaged[offset + sid] = True

    try:
        index = index_shard(str(path), info.first_id, info.count)
    except FerDistError as err:
        return fail(str(err), info.ids)
    if len(info.sample_digests) != info.count * DIGEST_CHARS:
        return fail(f"{path}: the manifest holds digests for another number of samples than {info.count}",
                    info.ids)
    # The samples' bytes as they lie in the file (one read): a sample is one run of bytes, headers, data
    # and padding of its members, the bytes the writer's digest covered, so nothing is rebuilt to check it.
    data = shard_bytes(index)
    at, size = index.at["cls"].tolist(), index.size["cls"].tolist()
    labelled = 0
    for row in range(info.count):
        key = info.first_id + row
        digest = info.sample_digests[row * DIGEST_CHARS:(row + 1) * DIGEST_CHARS]
        problem = _sample_problem(path, index, row, data, digest)
        if problem is None:
            try:
                label = parse_cls(data[at[row]:at[row] + size[row]], str(path), key)
            except FerDistError as err:
                problem = str(err)
        if problem is not None:
            fail(problem, [key])
            continue
        out.labels[offset + key] = label
        labelled += label >= 0
    if on_error == "raise" and labelled != info.labelled:
        raise FerDistError(f"{path}: {labelled} labelled samples, manifest says {info.labelled}")


def checked_labels(shardset: ShardSet, on_error: OnError = "raise", *,
                   part: tuple[int, int] = (0, 1)) -> CheckedLabels:
    """The label pass over every split the shard set names, each shard once, every digest checked.

    `part` = (rank, world): only every world-th of those shards, from the rank-th on; the others' ids stay
    unlabelled and not `covered` (`dist.label_pass` reduces the parts of a launch's processes)."""
    if on_error not in ("raise", "skip"):
        raise FerDistError(f"data.on_error: expected raise or skip, got {on_error!r}")
    rank, world = part
    n = shardset.num_ids
    out = CheckedLabels(torch.full((n,), -1, dtype=torch.long), torch.zeros(n, dtype=torch.bool),
                        torch.zeros(n, dtype=torch.bool))
    seen: set[Path] = set()
    for entry in range(len(shardset.entries)):
        for path, info, offset in shardset.infos(entry):  # every process walks all: the same numbering
            if path in seen:
                continue
            seen.add(path)
            if (len(seen) - 1) % world == rank:
                _check_shard(path, info, offset, out, on_error)
                out.covered[offset + info.first_id:offset + info.first_id + info.count] = True
    out.labels[out.damaged] = -1
    return out

def _version(shard: RunShard) -> tuple[str, int, int]:
    """(file, size, mtime) of a shard as this process indexed it; as on disk where it cannot be indexed (a
    shard left out under data.on_error=skip)."""
    try:
        return (str(shard.path), *shard.index().stamp)
    except FerDistError:
        st = os.stat(shard.path)
        return (str(shard.path), st.st_size, st.st_mtime_ns)


def files_digest(shardset: ShardSet, on_error: OnError) -> int:
    """A 63-bit digest of every shard file as this process indexed it (path, size, mtime) and of the rule
    for damaged samples: where two processes' agree, a label pass of one holds for the other."""
    shards = (s for part in range(len(shardset.entries)) for s in shardset.shards(part))
    versions = [on_error, *(_version(s) for s in shards)]
    return int.from_bytes(hashlib.sha256(repr(versions).encode()).digest()[:8], "big") >> 1


def save_checked(path: Path, checked: CheckedLabels, shardset: ShardSet, on_error: OnError) -> None:
    """A whole label pass into `path` (.npz, no pickle) for the ranks of a launch, with the files' digest."""
    np.savez(path, labels=checked.labels.numpy().astype(np.int8), damaged=checked.damaged.numpy(),
             digest=np.int64(files_digest(shardset, on_error)),
             problems=np.array(checked.problems, dtype=str))


def launch_checked(shardset: ShardSet, on_error: OnError) -> CheckedLabels | None:
    """The label pass `fer-dist train` made before starting this process (the file CHECKED_ENV names), where
    it was made over the very files this process sees, under the same rule; else None (check them here)."""
    path = os.environ.get(CHECKED_ENV)
    if not path:
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            if int(saved["digest"]) != files_digest(shardset, on_error) or \
                    saved["labels"].shape != (shardset.num_ids,):
                return None
            labels, damaged = saved["labels"].astype(np.int64), saved["damaged"].astype(bool)
            problems = [str(p) for p in saved["problems"]]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, FerDistError):  # check here instead
        return None
    return CheckedLabels(torch.from_numpy(labels), torch.from_numpy(damaged),
                         torch.ones(shardset.num_ids, dtype=torch.bool), problems)

# ---------------------------------------------------------------------------------------------------------
# the run's parts: X_l, X_u, val, test

@dataclass
class RunData:
    """Masks over the run's ids ([num_ids] bool) and the shards each part is read from."""

    shardset: ShardSet
    labels: torch.Tensor        # [num_ids] long: the class, -1 where unlabelled (or not in any split used)
    labelled: torch.Tensor      # X_l
    unlabelled: torch.Tensor    # X_u: labels hidden from the method
    val: torch.Tensor
    test: torch.Tensor
    train_shards: list[RunShard]
    val_shards: list[RunShard]
    test_shards: list[RunShard]
    skipped: list[str] = field(default_factory=list)  # damaged samples left out (data.on_error=skip)

    @property
    def num_ids(self) -> int:
        return int(self.labels.numel())

    def method_labels(self) -> torch.Tensor:
        """Labels as the method sees them: X_l's classes, -1 for everything else."""
        return torch.where(self.labelled, self.labels, torch.full_like(self.labels, -1))


def _entries(cfg: DataConfig) -> list[tuple[str, ShardsRef]]:
    # X_u last: directories get their id offsets in this order, so the ids of X_l, val and test do not
    # depend on which unlabelled set an arm adds (arms share what they do not vary).
    return [(part, ref) for part in ("labelled", "val", "test", "unlabelled") for ref in getattr(cfg, part)]


def _mask(num_ids: int, shards: list[RunShard]) -> torch.Tensor:
    mask = torch.zeros(num_ids, dtype=torch.bool)
    for s in shards:
        mask[s.first_run_id: s.first_run_id + s.count] = True
    return mask


def fold_mask(num_ids: int, shards: list[RunShard], ref: ShardsRef,
              damaged: torch.Tensor | None = None) -> torch.Tensor:
    """The ids of `shards` whose fold (their `.json` metadata, from `shard --folds K`) is in `ref.folds`;
    never a `damaged` id (left out under data.on_error=skip, its metadata not to be trusted)."""
    keep, wanted = torch.zeros(num_ids, dtype=torch.bool), set(ref.folds or ())
    for shard in shards:
        ids = torch.arange(shard.first_run_id, shard.first_run_id + shard.count)
        if damaged is not None:
            ids = ids[~damaged[ids]]
        if not ids.numel():
            continue  # a shard that could not be indexed at all
        keys = ids.numpy() - shard.offset
        for sid, members in read_samples(shard.index(), keys, ("json",)):
            try:
                fold = json.loads(members.get("json", b"{}")).get("fold")
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                raise FerDistError(f"{shard.path}: sample {sid:08d} has no valid .json member") from None
            if not isinstance(fold, int):
                raise FerDistError(f"{ref.dir}: data folds {ref.folds}: its samples carry no fold id "
                                   "(shard it with --folds K)")
            keep[shard.offset + sid] = fold in wanted
    return keep


def share_mask(mask: torch.Tensor, labels: torch.Tensor, local_ids: torch.Tensor, share: float,
               seed: int) -> torch.Tensor:
    """The `share` of `mask`'s ids kept, class by class (-1 a class of its own): per class the
    floor(share * n + 0.5) ids of smallest hash of (seed, id within its shard folder). Ranking by a keyed
    hash makes shares nested (0.1 inside 0.4) and independent of the other folders a config names."""
    key = int.from_bytes(hashlib.sha256(f"fer-dist/share/{seed}".encode()).digest()[:8], "big")
    rank = mix64(local_ids.numpy().astype(np.uint64) * GOLDEN ^ np.uint64(key))
    keep = torch.zeros_like(mask)
    for cls in torch.unique(labels[mask]).tolist():
        ids = torch.nonzero(mask & (labels == cls)).flatten()
        n = int(share * ids.numel() + 0.5)
        order = np.lexsort((ids.numpy(), rank[ids.numpy()]))  # by hash, then by id
        keep[ids[torch.from_numpy(order[:n])]] = True
    return keep


def _local_ids(num_ids: int, shardset: ShardSet) -> torch.Tensor:
    """Each run id's id within its shard folder (run id - the folder's offset)."""
    local = torch.arange(num_ids)
    for entry in shardset.offsets:
        local[entry["offset"]: entry["offset"] + entry["num_ids"]] -= entry["offset"]
    return local


def _unique(shards: list[RunShard]) -> list[RunShard]:
    seen, out = set(), []
    for s in shards:
        if s.path not in seen:
            seen.add(s.path)
            out.append(s)
    return out


def load_run_data(cfg: DataConfig, seed: int = 0,
                  label_pass: Callable[[ShardSet, OnError], CheckedLabels] = checked_labels) -> RunData:
    """Open every shard directory the config names and build the masks (reads only `.cls` members);
    `seed` draws the `share` subsets where data.subset_seed is None. `label_pass` checks the labels: the
    ranks of a launch split it (`dist.label_pass`)."""
    entries = _entries(cfg)
    shardset = ShardSet([(ref.dir, ref.splits) for _, ref in entries])
    parts: dict[str, list[RunShard]] = {"labelled": [], "unlabelled": [], "val": [], "test": []}
    for i, (part, _) in enumerate(entries):
        parts[part] += shardset.shards(i)
    checked = label_pass(shardset, cfg.on_error)  # every sample's digest checked
    labels = checked.labels
    n = shardset.num_ids
    has_label = labels >= 0
    named = {part: torch.zeros(n, dtype=torch.bool) for part in parts}
    for i, (part, ref) in enumerate(entries):
        mask = _mask(n, shardset.shards(i))
        if ref.folds is not None:
            mask &= fold_mask(n, shardset.shards(i), ref, checked.damaged)
        if ref.share is not None:
            subset_seed = seed if cfg.subset_seed is None else cfg.subset_seed
            mask = share_mask(mask & ~checked.damaged, labels, _local_ids(n, shardset), ref.share,
                              subset_seed)
        named[part] |= mask
    labelled = named["labelled"] & has_label
    unlabelled = named["unlabelled"] & ~labelled & ~checked.damaged
    val = named["val"] & has_label
    test = named["test"] & has_label
    if not labelled.any():
        raise FerDistError("data.labelled: the splits named hold no labelled sample")
    if not val.any():
        raise FerDistError("data.val: the splits named hold no labelled sample")
    # X_u may overlap the test split (the paper's transductive protocol: labels stay hidden); X_l may not.
    leak = labelled & (val | test)
    if leak.any():
        raise FerDistError(f"data: {int(leak.sum())} labelled training samples are also val/test samples; "
                           "check data.labelled against data.val and data.test")
    return RunData(
        shardset=shardset, labels=labels, labelled=labelled, unlabelled=unlabelled, val=val, test=test,
        train_shards=_unique(parts["labelled"] + parts["unlabelled"]),
        val_shards=_unique(parts["val"]), test_shards=_unique(parts["test"]), skipped=checked.problems,
    )
