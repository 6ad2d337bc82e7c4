"""Every sample a run uses checked once against its manifest digest, before the first step.

The manifest keeps a CRC-32 per sample over its tar bytes: its members' headers, data and padding, one run
of bytes in the file (`shards.sample_digest`). The label pass that every run makes anyway (`read_labels`)
reads each shard once and checks every sample's digest over that run as it lies on disk (its bounds from
the shard index), so a flipped byte anywhere in a sample - a header, a `.cls` member that would be a
silently wrong label, a `.json` member that would be a wrong fold - is found. The streams then read the
same file version without checking again: `read_samples` refuses a shard whose size or mtime changed since
it was indexed, so the hot read path pays nothing.

`on_error` decides what a damaged sample does: `raise` (the default) stops with a FerDistError naming the
shard and the sample; `skip` leaves the sample out of every part of the run (a shard that cannot even be
indexed: all its samples) and reports each one, for the trainer to count in its log.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from fer_dist.data.manifest import DIGEST_CHARS, ShardInfo
from fer_dist.data.shardread import ALLOWED, ShardIndex, index_shard, parse_cls, shard_bytes
from fer_dist.errors import FerDistError

if TYPE_CHECKING:
    from fer_dist.data.shardset import ShardSet  # shardset imports this module

OnError = Literal["raise", "skip"]


@dataclass
class CheckedLabels:
    """What the label pass found: every id's class (-1: unlabelled or damaged), the damaged ids, why."""

    labels: torch.Tensor                           # [num_ids] long
    damaged: torch.Tensor                          # [num_ids] bool: left out under on_error=skip
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


def checked_labels(shardset: ShardSet, on_error: OnError = "raise") -> CheckedLabels:
    """The label pass over every split the shard set names, each shard once, every digest checked."""
    if on_error not in ("raise", "skip"):
        raise FerDistError(f"data.on_error: expected raise or skip, got {on_error!r}")
    n = shardset.num_ids
    out = CheckedLabels(torch.full((n,), -1, dtype=torch.long), torch.zeros(n, dtype=torch.bool))
    seen: set[Path] = set()
    for entry in range(len(shardset.entries)):
        for path, info, offset in shardset.infos(entry):
            if path not in seen:
                seen.add(path)
                _check_shard(path, info, offset, out, on_error)
    out.labels[out.damaged] = -1
    return out
