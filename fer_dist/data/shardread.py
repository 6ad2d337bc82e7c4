"""Reading samples out of one shard tar: an allow-list of members, nothing decoded that is not asked for.

A shard is read front to back with a minimal tar header parser (regular files, ustar/GNU/pax names) instead
of `tarfile`, which costs about 4x more per member and would be the stream's largest overhead after the
augmentation. Every member header the reader passes is checked: a member whose extension is not `cls`,
`json` or `png`, or that is not a regular file, makes the read fail with a FerDistError naming the shard and
the sample key, before any byte of it is read and before anything else in that sample is decoded. Nothing
is ever unpickled; `json` is never read by the streams; a `png` member must carry the PNG signature before
cv2 sees it (cv2.imdecode would otherwise decode whatever format the bytes claim).
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import torch

from fer_dist.classes import NUM_CLASSES
from fer_dist.errors import FerDistError

ALLOWED = ("cls", "json", "png")
_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _octal(field: bytes, path: str) -> int:
    if field[0] & 0x80:
        raise FerDistError(f"{path}: tar member too large (base-256 size) for a face shard")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise FerDistError(f"{path}: corrupt tar header (field {field!r})") from None


def verify_header(header: bytes, path: str) -> None:
    """The header checksum; checked for members whose bytes are read (the others only need the magic)."""
    if sum(header) - sum(header[148:156]) + 256 != _octal(header[148:156], path):
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


def tar_members(f, path: str) -> Iterator[tuple[str, int, int, bytes]]:
    """(name, size, data offset, header) of each regular member of the open tar `f`, in file order.

    Every header must carry the ustar magic (a misaligned read cannot pass for a header); the checksum is
    left to `verify_header`, which costs more than the rest of the parse and matters only for bytes read.
    """
    offset, override = 0, {}
    while True:
        f.seek(offset)
        header = f.read(_BLOCK)
        if len(header) < _BLOCK:
            raise FerDistError(f"{path}: truncated tar (no end-of-archive block)")
        if not header[0]:  # end-of-archive: a member's name is never empty
            return
        if header[257:262] != b"ustar":
            raise FerDistError(f"{path}: corrupt tar (no ustar header at byte {offset})")
        name = header[:100].split(b"\0", 1)[0]
        if header[345]:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        size, kind = _octal(header[124:136], path), header[156:157]
        if kind in (b"x", b"g", b"L"):  # pax / GNU long-name headers describe the next member
            verify_header(header, path)
            body = f.read(size)
            offset += _BLOCK + -(-size // _BLOCK) * _BLOCK
            if kind == b"x":
                override = _pax(body)
            elif kind == b"L":
                override = {"path": body.split(b"\0", 1)[0].decode("utf-8")}
            continue
        text = override.get("path") or name.decode("utf-8", "replace")
        size = int(override.get("size", size))
        override = {}
        data_at = offset + _BLOCK
        offset = data_at + -(-size // _BLOCK) * _BLOCK
        if kind not in _REGULAR:
            raise FerDistError(f"{path}: member {text!r} is not a regular file; refusing the shard")
        yield text, size, data_at, header


def read_shard(
    path: str, keys: np.ndarray, fields: tuple[str, ...]
) -> Iterator[tuple[int, dict[str, bytes]]]:
    """(key, {field: bytes}) for the sample keys `keys` (ascending ids of the shard's directory).

    Only the members named in `fields` are read. Reading stops after the last wanted sample; every wanted key
    must be found, or FerDistError.
    """
    if keys.size == 0:
        return
    wanted, last = iter(keys.tolist()), int(keys[-1])
    want = next(wanted)
    key, members = None, {}
    with open(path, "rb", buffering=1 << 20) as f:
        for name, size, data_at, header in tar_members(f, path):
            stem, _, ext = name.rpartition(".")
            if ext not in ALLOWED or not stem.isdigit():
                raise FerDistError(f"{path}: sample {stem or name!r} has member {name!r}; only .cls, .json "
                                   "and .png are allowed, refusing the shard without decoding it")
            sid = int(stem)
            if key is not None and sid != key:
                yield key, members
                key, members = None, {}
                want = next(wanted, None)
                if want is None:
                    return
            if sid > last:
                break
            if sid == want:
                key = sid
                if ext in fields:
                    verify_header(header, path)
                    f.seek(data_at)
                    members[ext] = f.read(size)
            elif sid > want:
                break
    if key is not None:
        yield key, members
        want = next(wanted, None)
    if want is not None:
        raise FerDistError(f"{path}: sample {want:08d} (listed by the manifest) is missing or out of order")


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
