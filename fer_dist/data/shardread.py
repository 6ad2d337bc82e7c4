"""Reading samples out of one shard tar: an allow-list of members, nothing decoded that is not asked for.

A shard is first indexed: one walk over all its headers with a minimal tar parser (regular files,
ustar/GNU/pax names; `tarfile` costs about 4x more per member). Every header is checked: the ustar magic,
the checksum, the regular-file type, a name `<key>.<ext>` with `ext` on the allow-list (`cls`, `json`,
`png`) and the keys the manifest lists, in order. A shard that breaks any of these is refused with a
FerDistError naming the shard and the sample, before any member's bytes are read or decoded. The index
(each sample's member offsets) is kept per process, so later reads of the shard - every epoch, every
round - `pread` the members they need without parsing a header: the walk cost ~5 us per sample, the
stream's largest overhead after decoding and augmenting.

Nothing is ever unpickled; `json` is never read by the streams; a `png` member must carry the PNG signature
before cv2 sees it (cv2.imdecode would otherwise decode whatever format the bytes claim).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from fer_dist.classes import NUM_CLASSES
from fer_dist.errors import FerDistError

ALLOWED = ("cls", "json", "png")
_ALLOWED = tuple(ext.encode() for ext in ALLOWED)
_BLOCK = 512
_CHUNK = 1 << 20  # bytes the index walk reads ahead at a time
_REGULAR = (ord("0"), 0, ord("7"))  # tar type flags of a regular file
_PAX, _LONG_NAME = ord("x"), ord("L")
_EXTENDED = (_PAX, ord("g"), _LONG_NAME)  # headers that describe the next member(s), not members
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _octal(field: bytes, path: str) -> int:
    try:
        return int(field.rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        pass
    if field[0] & 0x80:
        raise FerDistError(f"{path}: tar member too large (base-256 size) for a face shard")
    raise FerDistError(f"{path}: corrupt tar header (field {field!r})")


def _byte_sum(data: bytes) -> int:
    """sum(data) for at most 512 bytes, ~7x faster: Adler-32's low half is 1 + the byte sum mod 65521,
    which is exact for 256 bytes (at most 65,280)."""
    return (zlib.adler32(data[:256]) & 0xFFFF) + (zlib.adler32(data[256:512]) & 0xFFFF) - 2


def verify_header(header: bytes, path: str) -> None:
    """The header checksum (checked for every header when a shard is indexed)."""
    if _byte_sum(header) - sum(header[148:156]) + 256 != _octal(header[148:156], path):
        name = header[:100].split(b"\0", 1)[0]
        raise FerDistError(f"{path}: corrupt tar header (checksum) for member {name!r}")


def _pax(data: bytes) -> dict[str, str]:
    """Records `<len> <key>=<value>\\n` of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        key, _, value = data[space + 1:pos + int(data[pos:space]) - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8")
        pos += int(data[pos:space])
    return out


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample's members lie in one shard, from one checked walk over all its headers.

    `at[ext][i]` / `size[ext][i]`: byte offset and length of sample `first_key + i`'s `ext` member, -1 where
    the sample has none. `stamp` (file size, mtime in ns) ties the index to the bytes it was made from.
    """

    path: str
    stamp: tuple[int, int]
    first_key: int
    count: int
    at: dict[str, np.ndarray]
    size: dict[str, np.ndarray]


def _stamp(f) -> tuple[int, int]:
    st = os.fstat(f.fileno())
    return st.st_size, st.st_mtime_ns


def _walk(f, path: str) -> Iterator[tuple[bytes, int, int]]:
    """(name, data offset, size) of each member of the open tar `f`, every header checked: the ustar magic
    (a misaligned read cannot pass for a header), the checksum, the regular-file type."""
    pos, override, buf, base = 0, None, b"", 0
    while True:
        if pos - base + _BLOCK > len(buf) or pos < base:  # read ahead in large chunks, not per header
            f.seek(pos)
            buf, base = f.read(_CHUNK), pos
        at = pos - base
        header = buf[at:at + _BLOCK]
        if len(header) < _BLOCK:
            raise FerDistError(f"{path}: truncated tar (no end-of-archive block)")
        if not header[0]:  # end-of-archive: a member's name is never empty
            return
        if header[257:262] != b"ustar":
            raise FerDistError(f"{path}: corrupt tar (no ustar header at byte {pos})")
        verify_header(header, path)
        size, kind = _octal(header[124:136], path), header[156]
        if kind in _EXTENDED:  # pax / GNU long-name headers describe the next member
            f.seek(pos + _BLOCK)
            body = f.read(size)
            try:
                if kind == _PAX:
                    override = _pax(body)
                    int(override.get("size", 0))
                elif kind == _LONG_NAME:
                    override = {"path": body.split(b"\0", 1)[0].decode("utf-8")}
            except (ValueError, IndexError):  # UnicodeDecodeError is a ValueError
                raise FerDistError(f"{path}: corrupt tar extended header at byte {pos}") from None
            pos += _BLOCK + ((size + _BLOCK - 1) & -_BLOCK)  # a global pax header ('g') changes nothing here
            continue
        name = header[:100].split(b"\0", 1)[0]
        if header[345]:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        if override is not None:
            name = override["path"].encode("utf-8") if "path" in override else name
            size = int(override.get("size", size))
            override = None
        if kind not in _REGULAR:
            raise FerDistError(f"{path}: member {name.decode('utf-8', 'replace')!r} is not a regular file; "
                               "refusing the shard")
        yield name, pos + _BLOCK, size
        pos += _BLOCK + ((size + _BLOCK - 1) & -_BLOCK)


def _build_index(path: str, first_key: int, count: int) -> ShardIndex:
    at = {ext: np.full(count, -1, np.int64) for ext in ALLOWED}
    size = {ext: np.full(count, -1, np.int64) for ext in ALLOWED}
    state = [first_key, None]  # the next key the manifest lists; the current sample's key
    try:
        with open(path, "rb", buffering=0) as f:
            stamp = _stamp(f)
            _index_members(_walk(f, path), path, first_key, count, at, size, state)
    except FerDistError as err:
        if " sample " in str(err):
            raise
        # name the sample the damage lies in: the current one until its last member is found, then the next
        expect, last = state
        broken = last if last is not None and size[ALLOWED[-1]][last - first_key] < 0 else expect
        raise FerDistError(f"{err} (in sample {min(broken, first_key + count - 1):08d})") from None
    if state[0] != first_key + count:
        raise FerDistError(f"{path}: sample {state[0]:08d} (listed by the manifest) is missing or out of "
                           "order")
    return ShardIndex(path, stamp, first_key, count, at, size)


def _index_members(members: Iterator[tuple[bytes, int, int]], path: str, first_key: int, count: int,
                   at: dict[str, np.ndarray], size: dict[str, np.ndarray], state: list) -> None:
    """Record each member's offset and size; `state` ([next key the manifest lists, current sample's key])
    is kept up to date so that a failure can name the sample it broke in."""
    for name, data_at, length in members:
        expect, last = state
        stem, _, ext = name.rpartition(b".")
        if ext not in _ALLOWED or not stem.isdigit():
            text = name.decode("utf-8", "replace")
            raise FerDistError(f"{path}: sample {stem.decode('utf-8', 'replace') or text!r} has member "
                               f"{text!r}; only .cls, .json and .png are allowed, refusing the shard "
                               "without decoding it")
        key = int(stem)
        if key != last:  # a new sample: the manifest's next key, no other
            if key != expect or key >= first_key + count:
                missing = f"sample {expect:08d} (listed by the manifest) is missing or out of order"
                raise FerDistError(f"{path}: {missing}" if expect < first_key + count else
                                   f"{path}: sample {key:08d} is beyond the {count} the manifest lists")
            state[:] = [key + 1, key]
        i, field = key - first_key, ext.decode()
        if at[field][i] >= 0:
            raise FerDistError(f"{path}: sample {key:08d} has two {field!r} members")
        at[field][i], size[field][i] = data_at, length


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


def read_samples(
    index: ShardIndex, keys: np.ndarray, fields: tuple[str, ...]
) -> Iterator[tuple[int, dict[str, bytes]]]:
    """(key, {field: bytes}) for the sample keys `keys` of an indexed shard, only the members in `fields`.

    One pread per member, straight into its bytes: no read-ahead buffer to copy through (a 1 MB one cost
    more in cache misses for the decode that follows than the system calls it saved). A file changed
    since it was indexed is refused rather than read at stale offsets.
    """
    if keys.size == 0:
        return
    rows = keys - index.first_key
    if rows.min() < 0 or rows.max() >= index.count:
        bad = int(keys[(rows < 0) | (rows >= index.count)][0])
        raise FerDistError(f"{index.path}: sample {bad:08d} is not among the shard's {index.count}")
    cols = [(field, index.at[field][rows].tolist(), index.size[field][rows].tolist()) for field in fields]
    with open(index.path, "rb", buffering=0) as f:
        if _stamp(f) != index.stamp:
            raise FerDistError(f"{index.path}: the shard changed while the run was reading it")
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
