"""Shard tars (deterministic bytes) and their verification against the manifest (manifest.py).

A shard is a plain tar of samples `<key>.cls`, `<key>.json`, `<key>.png` (that order), key = the global id
as 8 digits. Headers are fixed (USTAR, mtime 0, uid/gid 0, no user names, mode 0444) so the same samples
give the same bytes. Each shard's sha256 is computed while it is written, and the manifest keeps a short
digest per sample so that verification can name the sample that changed, not only the shard.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fer_dist.classes import CLASSES, UNLABELLED, UNLABELLED_NAME
from fer_dist.data.manifest import DIGEST_CHARS, Manifest, ShardInfo, SplitInfo, read_manifest

MEMBERS: tuple[str, ...] = ("cls", "json", "png")
WRITE_BUFFER = 1 << 20  # bytes buffered per shard file being written


def sample_key(sample_id: int) -> str:
    """The 8-digit key of a global id."""
    return f"{sample_id:08d}"


def shard_file(split: str, index: int) -> str:
    """The file name of a split's index-th shard."""
    return f"{split}-{index:06d}.tar"


_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=True, separators=(",", ":"))
# The encoder's C core made once: JSONEncoder.encode builds it anew at every call, which costs a third of a
# sample's JSON. Its arguments are those JSONEncoder.iterencode passes (markers None: no cycle check; the
# documents are flat). Same bytes as _JSON.encode (a test compares them); _JSON where CPython lacks the core.
_ENCODE = None if json.encoder.c_make_encoder is None else json.encoder.c_make_encoder(
    None, _JSON.default, json.encoder.encode_basestring_ascii, None, ":", ",", True, False, True)


def dump_json(obj: object) -> bytes:
    """Canonical JSON bytes (sorted keys, ASCII) so equal data gives equal bytes."""
    if _ENCODE is None:
        return _JSON.encode(obj).encode("ascii")
    return "".join(_ENCODE(obj, 0)).encode("ascii")


# USTAR header fields around the two that vary (name, size): mode 0444, uid/gid 0, mtime 0, a regular file,
# no user names. Building headers from these is far faster than tarfile.addfile (which dominated the
# single-core pipeline) and keeps the bytes independent of the Python version; a test pins them to tarfile's.
_MODE_IDS = b"0000444\0" + b"0000000\0" * 2
_MTIME = b"00000000000\0"
# Type, link name, magic + version, user and group names, device numbers (empty, as tarfile writes them for
# regular files), prefix and padding.
_AFTER_CHKSUM = tarfile.REGTYPE + b"\0" * 100 + tarfile.POSIX_MAGIC + b"\0" * (64 + 16 + 155 + 12)
_FIXED_SUM = sum(_MODE_IDS) + sum(_MTIME) + sum(_AFTER_CHKSUM) + 8 * ord(" ")  # chksum counts as 8 spaces
_PADDING = [b"\0" * n for n in range(tarfile.BLOCKSIZE)]  # by length: the zeros that complete a block
_SUFFIXES = [(f".{ext}".encode("ascii"), sum(f".{ext}".encode("ascii"))) for ext in MEMBERS]  # name ends


def tar_member(name: str, data: bytes) -> bytes:
    """One regular-file member (header, data, padding) with the fixed header fields, as tarfile writes it."""
    raw = name.encode("ascii")
    return _header(raw, sum(raw), len(data)) + data + _PADDING[-len(data) % tarfile.BLOCKSIZE]


def _header(raw: bytes, raw_sum: int, size: int) -> bytes:
    """A member's header block from its name (and the name's byte sum, its padding adds nothing) and size."""
    field, field_sum = _size_field(size)
    chksum = b"%06o\0 " % (_FIXED_SUM + raw_sum + field_sum)
    return b"".join((raw.ljust(100, b"\0"), _MODE_IDS, field, _MTIME, chksum, _AFTER_CHKSUM))


@functools.lru_cache(maxsize=1 << 16)
def _size_field(size: int) -> tuple[bytes, int]:
    """A header's size field and its byte sum (sizes repeat: .cls members, PNGs of similar faces)."""
    field = b"%011o\0" % size
    return field, sum(field)


def sample_bytes(key: str, members: dict[str, bytes]) -> bytes:
    """A sample's members as they lie in the tar, in MEMBERS order."""
    return _sample_bytes(key, [members[ext] for ext in MEMBERS])


def _sample_bytes(key: str, contents: Sequence[bytes]) -> bytes:
    """sample_bytes from the members' contents in MEMBERS order (_header inlined: once per sample)."""
    raw = key.encode("ascii")
    key_sum = sum(raw)
    parts: list[bytes] = []
    for (tail, fixed_sum), data in zip(_name_tails(len(raw)), contents, strict=True):
        field, field_sum = _size_field(len(data))
        parts += (raw, tail, field, _MTIME, b"%06o\0 " % (fixed_sum + key_sum + field_sum), _AFTER_CHKSUM,
                  data, _PADDING[-len(data) % tarfile.BLOCKSIZE])
    return b"".join(parts)


@functools.lru_cache(maxsize=8)
def _name_tails(key_length: int) -> tuple[tuple[bytes, int], ...]:
    """Per member, in MEMBERS order: the header bytes from the end of the key to the size field (the
    name's `.ext` and NUL padding, mode, uid, gid), and the byte sum of every fixed header field."""
    return tuple(((suffix + b"\0" * (100 - key_length - len(suffix)) + _MODE_IDS), _FIXED_SUM + suffix_sum)
                 for suffix, suffix_sum in _SUFFIXES)


def sample_digest(key: str, members: dict[str, bytes]) -> str:
    """A sample's CRC-32 over its tar bytes (names, sizes and contents): any changed byte changes it."""
    return f"{zlib.crc32(sample_bytes(key, members)):08x}"


def tar_end(written: int) -> bytes:
    """The end-of-archive blocks and the padding to a whole record, as tarfile.close() writes them."""
    end = 2 * tarfile.BLOCKSIZE
    return b"\0" * (end + (-(written + end) % tarfile.RECORDSIZE))


class _OpenShard:
    """A shard being written: its file, running sha256 and size, and what its ShardInfo will say."""

    def __init__(self, path: Path, first_id: int) -> None:
        self.path, self.first_id = path, first_id
        self.file = open(path, "wb", buffering=WRITE_BUFFER)  # noqa: SIM115 -- closed by close() or abort()
        self.sha256 = hashlib.sha256()
        self.written = 0
        self.digests: list[str] = []
        self.labelled = 0

    def add(self, key: str, contents: Sequence[bytes]) -> None:
        """Append a sample from its members' contents in MEMBERS order."""
        data = _sample_bytes(key, contents)
        self._write(data)
        self.digests.append(f"{zlib.crc32(data):08x}")  # sample_digest without building the bytes twice

    def close(self) -> ShardInfo:
        self._write(tar_end(self.written))
        self.file.close()
        return ShardInfo(self.path.name, len(self.digests), self.first_id, self.labelled,
                         self.sha256.hexdigest(), "".join(self.digests))

    def _write(self, data: bytes) -> None:
        # Hashing what is written avoids reading the shard a second time for its checksum.
        self.file.write(data)
        self.sha256.update(data)
        self.written += len(data)


class SplitWriter:
    """Writes one split's samples, in id order, into shards of at most `per_shard` samples."""

    def __init__(self, directory: Path, split: str, per_shard: int) -> None:
        self.directory, self.split, self.per_shard = Path(directory), split, per_shard
        self.class_counts: dict[str, int] = {}
        self._shards: list[ShardInfo] = []
        self._open: _OpenShard | None = None

    def add(self, sample_id: int, label: int | None, png: bytes, meta: dict) -> None:
        """Append one sample. `meta` (the source's metadata plus `aligned`, and `key` or `fold` where known)
        becomes its JSON document: this call adds `id`, `label`, `class` and `split` to it."""
        shard = self._open
        if shard is None:
            path = self.directory / shard_file(self.split, len(self._shards))
            shard = self._open = _OpenShard(path, sample_id)
        if label is None or label == UNLABELLED:
            label, name = UNLABELLED, UNLABELLED_NAME
        else:
            name = CLASSES[label]
            shard.labelled += 1
        meta["id"], meta["label"], meta["class"], meta["split"] = sample_id, label, name, self.split
        shard.add(sample_key(sample_id), (str(label).encode(), dump_json(meta), png))  # MEMBERS order
        self.class_counts[name] = self.class_counts.get(name, 0) + 1
        if len(shard.digests) == self.per_shard:
            self._shards.append(shard.close())
            self._open = None

    def close(self) -> SplitInfo:
        """Finish the last shard and describe the split."""
        if self._open is not None:
            self._shards.append(self._open.close())
            self._open = None
        count = sum(s.count for s in self._shards)
        labelled = sum(s.labelled for s in self._shards)
        counts = {name: self.class_counts[name] for name in sorted(self.class_counts)}
        return SplitInfo(count, labelled, count - labelled, counts, tuple(self._shards))

    def abort(self) -> None:
        """Close an open shard file without describing it (the caller removes the directory)."""
        if self._open is not None:
            self._open.file.close()
            self._open = None


@dataclass
class VerifyReport:
    """What `verify_shards` found: shards and complete samples read, and one line per problem."""

    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every shard matches the manifest."""
        return not self.problems


def verify_shards(directory: Path) -> VerifyReport:
    """Re-read every shard: sha256, members, counts and per-sample digests against the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    report = VerifyReport(problems=_check_manifest(manifest))
    for _, info in manifest.shards():
        report.shards += 1
        path = directory / info.file
        if not path.is_file():
            report.problems.append(f"{path}: shard listed in the manifest is missing")
            continue
        data = path.read_bytes()
        found, problems = _check_tar(data, info)
        if not problems and hashlib.sha256(data).hexdigest() != info.sha256:
            problems = ["sha256 differs from the manifest though every sample matches (tar padding changed)"]
        report.samples += found
        report.problems += [f"{path}: {p}" for p in problems]
    listed = {info.file for _, info in manifest.shards()}
    report.problems += [f"{p}: tar file not listed in the manifest" for p in sorted(directory.glob("*.tar"))
                        if p.name not in listed]
    return report


def _check_manifest(m: Manifest) -> list[str]:
    """Ids contiguous 0..num_ids-1 in shard order, and every count adding up."""
    problems, next_id = [], 0
    for _, info in m.shards():
        if info.first_id != next_id:
            problems.append(f"manifest: {info.file} starts at id {info.first_id}, expected {next_id}")
        if len(info.sample_digests) != info.count * DIGEST_CHARS:
            problems.append(f"manifest: {info.file} has digests for a different number of samples")
        next_id = info.first_id + info.count
    if next_id != m.num_ids:
        problems.append(f"manifest: shards hold ids up to {next_id}, but num_ids is {m.num_ids}")
    for name, s in m.splits.items():
        if (sum(x.count for x in s.shards), sum(x.labelled for x in s.shards), s.labelled + s.unlabelled,
                sum(s.class_counts.values())) != (s.count, s.labelled, s.count, s.count):
            problems.append(f"manifest: split {name!r}: shard, labelled and class counts do not add up")
    return problems


def _read_samples(data: bytes, info: ShardInfo) -> tuple[dict[str, dict[str, bytes]], list[str]]:
    """Members grouped by sample key, and problems met while reading (truncation, bad or extra members)."""
    expected = {sample_key(i) for i in info.ids}
    samples: dict[str, dict[str, bytes]] = {}
    problems: list[str] = []
    last = None  # the last member whose header was read, to name the sample where reading breaks
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            while (member := tar.next()) is not None:
                last = member.name
                key, _, ext = member.name.partition(".")
                known = key in expected and ext in MEMBERS and member.isfile()
                if not known or ext in samples.get(key, {}):
                    problems.append(f"sample {key}: unexpected member {member.name!r}")
                    continue
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
            rest = data[tar.offset :]
    except (tarfile.TarError, EOFError) as exc:
        key = last.partition(".")[0] if last else sample_key(info.first_id)
        return samples, [*problems, f"sample {key}: truncated or damaged ({exc})"]
    if len(rest) < 2 * tarfile.BLOCKSIZE:
        problems.append(f"sample {_after(last, info)}: truncated (the tar ends after member {last!r})")
    elif rest.strip(b"\0"):
        # tarfile stops silently at a damaged header that is not the first one.
        problems.append(f"sample {_after(last, info)}: damaged tar header after member {last!r}")
    return samples, problems


def _after(member: str | None, info: ShardInfo) -> str:
    """The key of the sample the member after `member` belongs to (members come cls, json, png)."""
    if member is None:
        return sample_key(info.first_id)
    key, _, ext = member.partition(".")
    if ext != MEMBERS[-1] or not key.isdigit():
        return key
    return sample_key(min(int(key) + 1, info.first_id + info.count - 1))


def _check_tar(data: bytes, info: ShardInfo) -> tuple[int, list[str]]:
    """Complete samples found in one shard's bytes, and its problems naming the samples concerned."""
    samples, problems = _read_samples(data, info)
    complete = labelled = 0
    missing: list[str] = []
    for n, sample_id in enumerate(info.ids):
        key = sample_key(sample_id)
        members = samples.get(key, {})
        if not members:
            missing.append(key)
            continue
        if set(members) != set(MEMBERS):
            lacking = ", ".join(f".{e}" for e in MEMBERS if e not in members)
            problems.append(f"sample {key}: missing member {lacking}")
            continue
        complete += 1
        labelled += members["cls"].strip() != str(UNLABELLED).encode()
        if sample_digest(key, members) != info.sample_digests[n * DIGEST_CHARS : (n + 1) * DIGEST_CHARS]:
            problems.append(f"sample {key}: content differs from the manifest's digest")
    if missing:
        span = missing[0] if len(missing) == 1 else f"{missing[0]}..{missing[-1]} ({len(missing)} samples)"
        problems.append(f"sample {span} missing")
    if complete != info.count:
        problems.append(f"holds {complete} complete samples, the manifest says {info.count}")
    elif labelled != info.labelled:
        problems.append(f"holds {labelled} labelled samples, the manifest says {info.labelled}")
    return complete, problems
