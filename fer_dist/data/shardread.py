"""Reading samples out of one shard tar: an allow-list of members, nothing decoded that is not asked for.

A shard is first indexed: one walk over all its headers with `tarfile` (which checks each header's
checksum; a damaged header ends its walk, and the manifest's count of samples then refuses the shard).
Every member must be a regular file named `<key>.<ext>` with `ext` on the allow-list (`cls`, `json`,
`png`), its data inside the file, and the keys must be the manifest's, in order. A shard that breaks any
of these is refused with a FerDistError naming the shard and the sample, before any member's bytes are
read or decoded. The index (each sample's member offsets, `TarInfo.offset_data`) is kept per process and
file version, so later reads - every epoch, every round - `pread` the members they need.

Nothing is ever unpickled; `json` is never read by the streams; a `png` member must carry the PNG signature
before cv2 sees it (cv2.imdecode would otherwise decode whatever format the bytes claim).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from fer_dist.classes import NUM_CLASSES
from fer_dist.errors import FerDistError

ALLOWED = ("cls", "json", "png")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample's members lie in one shard, from one checked walk over all its headers.

    `at[ext][i]` / `size[ext][i]`: byte offset and length of sample `first_key + i`'s `ext` member, -1 where
    the sample has none. `span[i]`: the sample's bytes as they lie in the file, its first member's header to
    its last member's padding (the bytes its manifest digest covers). `stamp` (file size, mtime in ns) ties
    the index to the bytes it was made from.
    """

    path: str
    stamp: tuple[int, int]
    first_key: int
    count: int
    at: dict[str, np.ndarray]
    size: dict[str, np.ndarray]
    span: np.ndarray  # [count, 2]: start, end


def _stamp(f) -> tuple[int, int]:
    st = os.fstat(f.fileno())
    return st.st_size, st.st_mtime_ns


def _walk(f, path: str, file_size: int) -> Iterator[tarfile.TarInfo]:
    """The members of the open tar `f`: regular files, their data inside the file."""
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    raise FerDistError(f"{path}: member {member.name!r} is not a regular file; refusing the "
                                       "shard")
                if member.offset_data + member.size > file_size:
                    raise FerDistError(f"{path}: truncated tar (member {member.name!r} ends past the file)")
                yield member
    except tarfile.TarError as err:  # a damaged first header (later ones end the walk: the count tells)
        raise FerDistError(f"{path}: corrupt tar ({err})") from None


def _missing(path: str, key: int) -> str:
    return f"{path}: sample {key:08d} (listed by the manifest) is missing or out of order"


def _build_index(path: str, first_key: int, count: int) -> ShardIndex:
    at = {ext: np.full(count, -1, np.int64) for ext in ALLOWED}
    size = {ext: np.full(count, -1, np.int64) for ext in ALLOWED}
    span = np.full((count, 2), -1, np.int64)
    with open(path, "rb") as f:
        stamp = _stamp(f)
        try:
            _record(_walk(f, path, stamp[0]), path, first_key, at, size, span)
        except FerDistError as err:
            if " sample " in str(err):
                raise
            # the sample the damage lies in: the current one until its last member is found, then the next
            row = np.count_nonzero(span[:, 0] >= 0) - 1
            broken = row if row >= 0 and size[ALLOWED[-1]][row] < 0 else row + 1
            raise FerDistError(f"{err} (in sample {first_key + min(broken, count - 1):08d})") from None
    found = np.count_nonzero(span[:, 0] >= 0)
    if found != count:
        raise FerDistError(f"{_missing(path, first_key + found)} (or a damaged tar header before it "
                           "ended the archive)")
    return ShardIndex(path, stamp, first_key, count, at, size, span)


def _record(members: Iterator[tarfile.TarInfo], path: str, first_key: int, at: dict[str, np.ndarray],
            size: dict[str, np.ndarray], span: np.ndarray) -> None:
    """Each member's offsets into the index's arrays; its sample is the current or the manifest's next."""
    row = -1  # the current sample's: key first_key + row
    for member in members:
        stem, _, ext = member.name.rpartition(".")
        if ext not in ALLOWED or not (stem.isascii() and stem.isdigit()):
            raise FerDistError(f"{path}: sample {stem or member.name!r} has member {member.name!r}; only "
                               ".cls, .json and .png are allowed, refusing the shard without decoding it")
        key = int(stem)
        if row < 0 or key != first_key + row:  # a new sample: the manifest's next key, no other
            row += 1
            if row == span.shape[0]:
                raise FerDistError(f"{path}: sample {key:08d} is beyond the {row} the manifest lists")
            if key != first_key + row:
                raise FerDistError(_missing(path, first_key + row))
            span[row, 0] = member.offset  # its first header (a pax or GNU long-name header, if any)
        if at[ext][row] >= 0:
            raise FerDistError(f"{path}: sample {key:08d} has two {ext!r} members")
        at[ext][row], size[ext][row] = member.offset_data, member.size
        span[row, 1] = member.offset_data - (-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


_INDEXES: dict[tuple[str, int, int, tuple[int, int]], ShardIndex] = {}


def index_shard(path: str, first_key: int, count: int) -> ShardIndex:
    """The shard's index, walked once per process and file version: every later read of the shard (each
    epoch, each round) goes straight to the members it needs."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise FerDistError(f"{path}: cannot read the shard ({err.strerror})") from None
    cache_key = (path, first_key, count, (st.st_size, st.st_mtime_ns))
    index = _INDEXES.get(cache_key)
    if index is None:
        index = _INDEXES[cache_key] = _build_index(path, first_key, count)
    return index


def _same_version(f, index: ShardIndex) -> None:
    """Refuse a file changed since it was indexed rather than read it at stale offsets."""
    if _stamp(f) != index.stamp:
        raise FerDistError(f"{index.path}: the shard changed while the run was reading it")


def shard_bytes(index: ShardIndex) -> bytes:
    """The whole shard in one read, as indexed."""
    with open(index.path, "rb", buffering=0) as f:
        _same_version(f, index)
        return f.read()


def read_samples(
    index: ShardIndex, keys: np.ndarray, fields: tuple[str, ...]
) -> Iterator[tuple[int, dict[str, bytes]]]:
    """(key, {field: bytes}) for the sample keys `keys` of an indexed shard, only the members in `fields`.

    One pread per member, straight into its bytes: no read-ahead buffer to copy through (a 1 MB one cost
    more in cache misses for the decode that follows than the system calls it saved).
    """
    if keys.size == 0:
        return
    rows = keys - index.first_key
    if rows.min() < 0 or rows.max() >= index.count:
        bad = int(keys[(rows < 0) | (rows >= index.count)][0])
        raise FerDistError(f"{index.path}: sample {bad:08d} is not among the shard's {index.count}")
    cols = [(field, index.at[field][rows].tolist(), index.size[field][rows].tolist()) for field in fields]
    with open(index.path, "rb", buffering=0) as f:
        _same_version(f, index)
        fd, pread = f.fileno(), os.pread
        for j, key in enumerate(keys.tolist()):
            members = {}
            for field, ats, sizes in cols:
                if ats[j] >= 0:
                    data = members[field] = pread(fd, sizes[j], ats[j])
                    if len(data) < sizes[j]:
                        raise FerDistError(f"{index.path}: truncated at sample {key:08d}")
            yield key, members


def parse_cls(data: bytes | None, path: str, sid: int) -> int:
    """The class index of a `.cls` member: -1 (unlabelled) or 0..K-1."""
    try:
        value = int(data) if data is not None else None
    except ValueError:
        value = None
    if value is None or not -1 <= value < NUM_CLASSES:
        raise FerDistError(f"{path}: sample {sid:08d} has no valid .cls member (got {data!r})")
    return value


def decode_png(data: bytes | None, path: str, sid: int) -> torch.Tensor:
    """A PNG member as a uint8 tensor [C, H, W], C = 1 (grey) or 3 (RGB order)."""
    if data is None or not data.startswith(_PNG_SIGNATURE):
        raise FerDistError(f"{path}: sample {sid:08d} has no PNG image")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.dtype != np.uint8:
        raise FerDistError(f"{path}: sample {sid:08d}: the PNG is unreadable or not 8-bit")
    if image.ndim == 2:
        return torch.from_numpy(image)[None]
    if image.shape[2] == 1:
        return torch.from_numpy(np.ascontiguousarray(image[..., 0]))[None]
    code = cv2.COLOR_BGR2RGB if image.shape[2] == 3 else cv2.COLOR_BGRA2RGB
    return torch.from_numpy(cv2.cvtColor(image, code)).permute(2, 0, 1).contiguous()
