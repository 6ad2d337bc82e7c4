"""Shard tars (deterministic bytes) and their verification against the manifest (manifest.py).

A shard is a plain tar of samples `<key>.cls`, `<key>.json`, `<key>.png` (that order), key = the global id
as 8 digits, written by webdataset's TarWriter with fixed headers (ustar, mtime 0, uid/gid 0, no user
names, mode 0444) so the same samples give the same bytes. Each shard's sha256 is computed while it is
written, and the manifest keeps a short digest per sample so that verification can name the sample that
changed, not only the shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from webdataset import TarWriter

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


def dump_json(obj: object) -> bytes:
    """Canonical JSON bytes (sorted keys, ASCII) so equal data gives equal bytes."""
    return _JSON.encode(obj).encode("ascii")


# Shards are written by webdataset's TarWriter, which served because it takes every header field that
# varies by machine or time as an option (user and group names, mode, mtime; uid/gid stay tarfile's 0) and,
# with encoder=False, writes the bytes it is given without encoding them. It writes a sample's members in
# sorted order, which is MEMBERS order. Its `format` option does not reach tarfile (webdataset 1.0.2), so
# tarfile writes its default, pax: for these short ASCII names and small integer fields that is a plain
# ustar header, the bytes sample_bytes builds (a test pins both to a USTAR tarfile's). Not ShardWriter: it
# names a finished shard only by its file, and the manifest wants each shard's sha256, sample digests, first
# id and labelled count, so SplitWriter starts each shard's TarWriter itself.
TAR_FIELDS: dict = {"user": "", "group": "", "mode": 0o444, "mtime": 0}


def sample_bytes(key: str, members: dict[str, bytes]) -> bytes:
    """A sample's members as they lie in the tar, in MEMBERS order: tarfile's header for the fixed fields,
    the data, the zeros that complete its last block."""
    parts: list[bytes] = []
    for ext in MEMBERS:
        data = members[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mode, info.mtime = len(data), TAR_FIELDS["mode"], TAR_FIELDS["mtime"]
        info.uname, info.gname = TAR_FIELDS["user"], TAR_FIELDS["group"]
        parts += (info.tobuf(tarfile.USTAR_FORMAT), data, bytes(-len(data) % tarfile.BLOCKSIZE))
    return b"".join(parts)


def sample_digest(key: str, members: dict[str, bytes]) -> str:
    """A sample's CRC-32 over its tar bytes (names, sizes and contents): any changed byte changes it."""
    return f"{zlib.crc32(sample_bytes(key, members)):08x}"


class _DigestingFile:
    """The file a TarWriter writes one shard into: each byte goes to disk, into the shard's sha256 and into
    the CRC-32 of the sample it belongs to, so the shard is never read back for its checksums.

    TarWriter writes through a buffered tarfile stream, so bytes arrive in pieces that do not follow
    samples: `ends` holds the end offset of each sample written whose bytes have not all arrived (each is
    queued before the stream can hand over bytes beyond it), and a sample's CRC is cut there.
    """

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb", buffering=WRITE_BUFFER)  # noqa: SIM115 -- closed by _OpenShard
        self.sha256 = hashlib.sha256()
        self.ends: deque[int] = deque()
        self.digests: list[str] = []  # per sample whose bytes have all arrived, in order
        self.received = 0
        self.crc = 0  # of the bytes received of the first sample not complete yet

    def write(self, data: bytes) -> int:
        self.file.write(data)
        self.sha256.update(data)
        view, at = memoryview(data), self.received
        self.received += len(data)
        while self.ends and self.ends[0] <= self.received:
            cut = self.ends.popleft() - at
            self.digests.append(f"{zlib.crc32(view[:cut], self.crc):08x}")
            view, at, self.crc = view[cut:], at + cut, 0
        self.crc = zlib.crc32(view, self.crc)
        return len(data)


class _OpenShard:
    """A shard being written: its TarWriter, the file that checksums it, and what its ShardInfo will say."""

    def __init__(self, path: Path, first_id: int) -> None:
        self.path, self.first_id = path, first_id
        self.file = _DigestingFile(path)
        self.tar = TarWriter(self.file, encoder=False, compress=False, **TAR_FIELDS)
        self.count = self.labelled = 0

    def add(self, sample: dict[str, bytes | str]) -> None:
        """Append a sample: {"__key__": key, ext: bytes for each ext in MEMBERS}."""
        self.tar.write(sample)
        # Where the sample ends: tarfile's position in the archive (a public attribute of TarFile, though
        # its documentation describes only TarInfo's offsets).
        self.file.ends.append(self.tar.tarstream.offset)
        self.count += 1

    def close(self) -> ShardInfo:
        self.tar.close()  # the end-of-archive blocks, padded to a whole record, then the last buffered bytes
        self.file.file.close()
        return ShardInfo(self.path.name, self.count, self.first_id, self.labelled,
                         self.file.sha256.hexdigest(), "".join(self.file.digests))

    def abort(self) -> None:
        """Close the file without finishing the tar (the caller removes it)."""
        # Finish the writer's stream anyway: left open, it would flush into the closed file when collected.
        # After a failed write (a full disk) that flush fails too; nothing of the shard is kept either way.
        with contextlib.suppress(OSError):
            self.tar.close()
        self.file.file.close()


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
        shard.add({"__key__": sample_key(sample_id), "cls": str(label).encode(), "json": dump_json(meta),
                   "png": png})
        self.class_counts[name] = self.class_counts.get(name, 0) + 1
        if shard.count == self.per_shard:
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
            self._open.abort()
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
