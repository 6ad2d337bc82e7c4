"""The shard reader against tarfile's own reading: every tar flavour it accepts, every defect it refuses."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fer_dist.data.shardread import index_shard, read_samples
from fer_dist.errors import FerDistError


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def _payload(key: int, ext: str) -> bytes:
    """Member bytes of distinct lengths (some past a 512-byte block) that say whose they are."""
    return f"{key}.{ext}:".encode() * (1 + (key * 7 + len(ext)) % 90)


def write_tar(path: Path, keys, *, fmt=tarfile.USTAR_FORMAT, name=lambda k, ext: f"{k:08d}.{ext}",
              exts=("cls", "json", "png")) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for key in keys:
            for ext in exts:
                _member(tar, name(key, ext), _payload(key, ext))
    return path


def _oracle(path: Path) -> dict[tuple[int, str], bytes]:
    with tarfile.open(path) as tar:
        return {(int(m.name.rpartition(".")[0]), m.name.rpartition(".")[2]): tar.extractfile(m).read()
                for m in tar.getmembers()}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_exactly_what_tarfile_reads(tmp_path, fmt):
    path = write_tar(tmp_path / "s.tar", range(10, 40), fmt=fmt)
    want = _oracle(path)
    index = index_shard(str(path), 10, 30)
    got = dict(read_samples(index, np.arange(10, 40), ("cls", "json", "png")))
    assert {(k, ext): v for k, m in got.items() for ext, v in m.items()} == want
    sparse = np.array([10, 11, 25, 39])  # gaps: forward reads and seeks
    got = list(read_samples(index, sparse, ("png",)))
    assert [k for k, _ in got] == sparse.tolist()
    assert all(m == {"png": want[(k, "png")]} for k, m in got)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_through_gnu_and_pax_headers(tmp_path, fmt):
    """A name over 100 bytes goes in a GNU long-name or pax header before the member."""
    path = write_tar(tmp_path / "s.tar", range(3), fmt=fmt, name=lambda k, ext: "0" * 120 + f"{k}.{ext}")
    got = dict(read_samples(index_shard(str(path), 0, 3), np.arange(3), ("png",)))
    assert got == {k: {"png": _payload(k, "png")} for k in range(3)}


def test_the_index_is_kept_until_the_file_changes(tmp_path):
    path = write_tar(tmp_path / "s.tar", range(4))
    first = index_shard(str(path), 0, 4)
    assert index_shard(str(path), 0, 4) is first
    stale = first
    write_tar(path, range(4), exts=("png", "cls"))  # rewritten: other offsets
    os.utime(path, ns=(stale.stamp[1] + 10**9, stale.stamp[1] + 10**9))
    fresh = index_shard(str(path), 0, 4)
    assert fresh is not stale
    assert dict(read_samples(fresh, np.arange(4), ("cls",)))[2] == {"cls": _payload(2, "cls")}
    with pytest.raises(FerDistError, match=r"s\.tar: the shard changed while the run was reading it"):
        list(read_samples(stale, np.arange(4), ("cls",)))


def _tamper(path: Path, at: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[at:at + len(value)] = value
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, needle", [
    # a name digit in sample 1's header: its checksum fails, tarfile's walk ends there
    (lambda p: _tamper(p, 1024 + 2, b"9"), r"sample 00000001 .listed by the manifest. is missing"),
    (lambda p: _tamper(p, 1024 + 257, b"xxxxx"), "sample 00000001 .listed by the manifest. is missing"),
    (lambda p: _tamper(p, 2, b"9"), r"corrupt tar .*in sample 00000000"),  # the first header
    (lambda p: p.write_bytes(p.read_bytes()[:512 * 5]), r"truncated tar .*in sample 00000002"),
])
def test_a_damaged_shard_is_refused_with_its_name(tmp_path, damage, needle):
    path = write_tar(tmp_path / "bad.tar", range(3), exts=("png",))  # one block of data per member
    damage(path)
    with pytest.raises(FerDistError, match=rf"bad\.tar: .*{needle}"):
        index_shard(str(path), 0, 3)


def test_a_link_is_refused(tmp_path):
    path = tmp_path / "link.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        _member(tar, "00000000.png", b"x")
        info = tarfile.TarInfo("00000001.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(FerDistError, match=r"'00000001\.png' is not a regular file"):
        index_shard(str(path), 0, 2)


@pytest.mark.parametrize("keys, first, count, needle", [
    ([0, 1, 3], 0, 4, "sample 00000002 .listed by the manifest. is missing or out of order"),
    ([0, 1, 2], 0, 4, "sample 00000003 .listed by the manifest. is missing"),
    ([0, 2, 1], 0, 3, "sample 00000001 .listed by the manifest. is missing or out of order"),
    ([0, 1, 2, 3], 0, 3, "sample 00000003 is beyond the 3 the manifest lists"),
    ([5, 6], 4, 3, "sample 00000004 .listed by the manifest. is missing"),
])
def test_keys_must_be_the_manifests(tmp_path, keys, first, count, needle):
    path = write_tar(tmp_path / "k.tar", keys)
    with pytest.raises(FerDistError, match=needle):
        index_shard(str(path), first, count)


def test_members_outside_the_allow_list_and_duplicates_are_refused(tmp_path):
    path = write_tar(tmp_path / "x.tar", range(2), exts=("png", "pyd"))
    with pytest.raises(FerDistError, match=r"sample '00000000' has member '00000000\.pyd'"):
        index_shard(str(path), 0, 2)
    path = write_tar(tmp_path / "d.tar", range(2), exts=("png", "png"))
    with pytest.raises(FerDistError, match="sample 00000000 has two 'png' members"):
        index_shard(str(path), 0, 2)


def test_a_missing_file_and_a_key_outside_the_shard_are_one_line(tmp_path):
    with pytest.raises(FerDistError, match=r"nope\.tar: cannot read the shard"):
        index_shard(str(tmp_path / "nope.tar"), 0, 1)
    index = index_shard(str(write_tar(tmp_path / "s.tar", range(2))), 0, 2)
    with pytest.raises(FerDistError, match="sample 00000002 is not among the shard's 2"):
        list(read_samples(index, np.array([1, 2]), ("png",)))


def test_a_global_pax_header_is_not_taken_for_a_name(tmp_path):
    path = tmp_path / "g.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "fer-dist"}) as tar:
        for key in range(2):
            _member(tar, f"{key:08d}.png", _payload(key, "png"))
    with tarfile.open(path) as tar:
        assert tar.pax_headers == {"comment": "fer-dist"}  # the file does start with a 'g' header
    got = dict(read_samples(index_shard(str(path), 0, 2), np.arange(2), ("png",)))
    assert got == {k: {"png": _payload(k, "png")} for k in range(2)}
