"""pack.py + shards.py on a fake source: what the tars hold, ids, determinism, atomic output, verification.

Shards are read back with plain tarfile here, independently of the project's readers.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from fer_dist.classes import CLASSES
from fer_dist.data.faces import align_face
from fer_dist.data.manifest import MANIFEST, read_manifest
from fer_dist.data.pack import MIN_AUTO_SHARD, MIN_SHARDS, _shuffle_key, pack, source_fingerprint
from fer_dist.data.shards import SplitWriter, dump_json, sample_bytes, sample_digest, verify_shards
from fer_dist.data.sources import (
    SOURCES,
    ImageReadError,
    Listing,
    Record,
    SourceOptions,
    SourceSpec,
    get_source,
)
from fer_dist.errors import FerDistError

BROKEN = "zz/broken.png"
LISTED: list[int] = []  # how often list_fake ran: pack must refuse bad output paths before listing


def fake_image(seed: int, size: int) -> np.ndarray:
    """A face-sized image, RGB for even seeds and grey for odd, larger than `size` so alignment crops."""
    shape = (size + 6, size + 2, 3) if seed % 2 == 0 else (size + 6, size + 2)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def broken_image(path: str) -> np.ndarray:
    raise ImageReadError(path, "not a readable image (truncated PNG)")


def buggy_loader() -> np.ndarray:
    raise ValueError("a bug in a loader, not a bad file")


def list_fake(src: list[Path], options: SourceOptions) -> Listing:
    """`subjects` subjects x `frames` records; every third frame unlabelled; one unreadable file."""
    LISTED.append(1)
    records = [Record(BROKEN, 3, {"path": BROKEN, "subject": "zz"}, functools.partial(broken_image, BROKEN))]
    if options.class_map == "bug":
        records.append(Record("zz/bug.png", 0, {"path": "zz/bug.png"}, buggy_loader))
    for s in range(options.subjects):
        for f in range(options.frames):
            key = f"s{s:02d}/f{f:02d}.png"
            meta = {"path": key, "subject": f"s{s:02d}", "frame": f}
            label = None if f % 3 == 2 else (s + f) % len(CLASSES)
            load = functools.partial(fake_image, 100 * s + f, options.image_size)
            records.append(Record(key, label, meta, load))
    return Listing(sorted(records, key=lambda r: r.key), [("notes.txt", "not an image")], [], "none")


FAKE_SPEC = SourceSpec("fake", __name__, "test source", "none", False, False, function="list_fake")


@pytest.fixture(autouse=True)
def fake_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SOURCES, "fake", FAKE_SPEC)


def fake_pack(out: Path, subjects: int = 10, frames: int = 4, **kwargs):
    kwargs = {"workers": 1, "progress": False, "seed": 0, **kwargs}
    size = kwargs.setdefault("size", 16)
    options = SourceOptions(subjects=subjects, frames=frames, image_size=size)
    return pack("fake", [], out, options=options, **kwargs)


def read_tars(directory: Path) -> dict[int, dict]:
    """id -> {"file", "members" (names in order), "cls", "json", "png"} over every tar, via plain tarfile."""
    samples: dict[int, dict] = {}
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".")
                sample = samples.setdefault(int(key), {"file": path.name, "members": []})
                sample["members"].append(member.name)
                sample[ext] = tar.extractfile(member).read()
                header = (member.mtime, member.uid, member.gid, member.mode, member.uname, member.gname)
                assert header == (0, 0, 0, 0o444, "", "")
    return samples


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_shards_hold_exactly_the_aligned_faces_labels_and_ids(tmp_path: Path) -> None:
    summary = fake_pack(tmp_path / "out", channels=1)
    m = summary.manifest
    samples = read_tars(tmp_path / "out")
    listing = list_fake([], SourceOptions(subjects=10, frames=4, image_size=16))
    by_key = {r.key: r for r in listing.records}
    assert sorted(samples) == list(range(m.num_ids)) and m.num_ids == 40  # the broken file took no id
    for sample_id, sample in samples.items():
        key = f"{sample_id:08d}"
        assert sample["members"] == [f"{key}.cls", f"{key}.json", f"{key}.png"]
        meta = json.loads(sample["json"])
        record = by_key[meta["key"]]
        label = -1 if record.label is None else record.label
        assert int(sample["cls"]) == label == meta["label"] and meta["id"] == sample_id
        assert meta["class"] == ("unlabelled" if label == -1 else CLASSES[label])
        assert {k: meta[k] for k in record.meta} == record.meta and meta["aligned"] == "not_attempted"
        image = record.load()
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
        expected = align_face(grey, 16, "none").image
        decoded = cv2.imdecode(np.frombuffer(sample["png"], np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(decoded, expected)
    assert m.skipped == [{"path": "notes.txt", "reason": "not an image"},
                         {"path": BROKEN, "reason": "unreadable: not a readable image (truncated PNG)"}]
    assert m.faces == {"detected": 0, "fallback": 0, "not_attempted": 40}


def write_split(directory: Path, pngs: list[bytes], per_shard: int):
    """SplitWriter over fixed samples (no image coding): ids 0.., every third unlabelled."""
    writer = SplitWriter(directory, "train", per_shard)
    for i, png in enumerate(pngs):
        writer.add(i, None if i % 3 == 2 else i % len(CLASSES), png, {"key": f"k{i}", "aligned": "detected"})
    return writer.close()


def tarfile_reference(path: Path) -> bytes:
    """The members of a tar rewritten by plain tarfile, USTAR, with the fixed header fields."""
    out = io.BytesIO()
    with tarfile.open(path) as tar, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as ref:
        for member in tar.getmembers():
            info = tarfile.TarInfo(member.name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                member.size, 0, 0o444, 0, 0, "", "")
            ref.addfile(info, tar.extractfile(member))
    return out.getvalue()


# Members of every size class around tar's 512-byte blocks, and larger than tarfile's 10 KB stream buffer
# (TarWriter's bytes reach the file in such pieces, not sample by sample).
PNG_SIZES = [0, 1, 511, 512, 513, 1500, 10240, 25_000, 3]


def test_shards_are_the_bytes_tarfile_writes_and_digests_cover_each_samples_bytes(tmp_path: Path) -> None:
    pngs = [bytes([n % 251]) * n for n in PNG_SIZES]
    split = write_split(tmp_path, pngs, per_shard=4)
    assert [s.count for s in split.shards] == [4, 4, 1]
    for info in split.shards:
        data = (tmp_path / info.file).read_bytes()
        assert data == tarfile_reference(tmp_path / info.file)
        assert hashlib.sha256(data).hexdigest() == info.sha256
        with tarfile.open(tmp_path / info.file) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        assert [m.name.partition(".")[2] for m, _ in members] == ["cls", "json", "png"] * info.count
        for n in range(info.count):
            sample = members[3 * n:3 * n + 3]
            (first, _), (last, _) = sample[0], sample[-1]
            raw = data[first.offset:last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE]
            key, contents = first.name.partition(".")[0], {m.name.partition(".")[2]: d for m, d in sample}
            assert sample_bytes(key, contents) == raw
            digest = info.sample_digests[8 * n:8 * n + 8]
            assert digest == f"{zlib.crc32(raw):08x}" == sample_digest(key, contents)


def test_the_shard_bytes_are_those_of_earlier_versions(tmp_path: Path) -> None:
    # sha256s and digests of shards written by the hand-built headers this writer replaced (commit b965711):
    # shards made before and after the change are the same files for the same inputs.
    pngs = [b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * (i + 1) for i in range(5)]
    split = write_split(tmp_path, pngs, per_shard=3)
    assert [(s.file, s.sha256, s.sample_digests) for s in split.shards] == [
        ("train-000000.tar", "e50ad512cb5d47b0ed269dab3f6942292ea671e31841b3960f5413d0492be857",
         "e2245bfadb096a2e1a8d90a7"),
        ("train-000001.tar", "e6ac4b9a227ce30487d740c5bc563b9740ef4402b0910f607c667631c6278e22",
         "b3eebe8ef87466e7")]


def test_the_helpers_tasks_need_neither_the_shard_writer_nor_torch() -> None:
    # A helper unpickles its tasks from imagework: webdataset imports torch, seconds of start-up per helper.
    code = ("import sys, fer_dist.data.imagework, fer_dist.data.sources; "
            "print(sorted({'webdataset', 'torch', 'fer_dist.data.shards'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_rgb_shards_store_true_rgb(tmp_path: Path) -> None:
    fake_pack(tmp_path / "out", subjects=2, frames=2, channels=3)
    for sample in read_tars(tmp_path / "out").values():
        meta = json.loads(sample["json"])
        seed = 100 * int(meta["subject"][1:]) + meta["frame"]
        image = fake_image(seed, 16)
        rgb = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        decoded = cv2.imdecode(np.frombuffer(sample["png"], np.uint8), cv2.IMREAD_UNCHANGED)
        expected = align_face(rgb, 16, "none").image
        np.testing.assert_array_equal(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), expected)


def test_ids_run_split_by_split_in_seeded_order_and_shards_are_contiguous(tmp_path: Path) -> None:
    m = fake_pack(tmp_path / "out", subjects=20, frames=3, samples_per_shard=7).manifest
    samples = read_tars(tmp_path / "out")
    metas = [json.loads(samples[i]["json"]) for i in range(m.num_ids)]
    splits = [meta["split"] for meta in metas]
    assert splits == sorted(splits, key=["train", "val", "test"].index)
    for name in ("train", "val", "test"):
        keys = [meta["key"] for meta in metas if meta["split"] == name]
        # shuffled by (seed, key), so a shard mixes subjects and classes; reproducible from the seed
        assert keys == sorted(keys, key=lambda k: _shuffle_key(0, k)) and keys != sorted(keys)
    assert list(m.splits) == ["train", "val", "test"]
    next_id = 0
    for split, info in m.shards():
        assert info.first_id == next_id and 1 <= info.count <= 7
        assert {samples[i]["file"] for i in info.ids} == {info.file} and info.file.startswith(f"{split}-")
        assert info.labelled == sum(int(samples[i]["cls"]) != -1 for i in info.ids)
        next_id += info.count
    assert next_id == m.num_ids == 60
    for name, s in m.splits.items():
        assert s.count == s.labelled + s.unlabelled == sum(s.class_counts.values())
        labels = [int(samples[i]["cls"]) for i in range(m.num_ids) if metas[i]["split"] == name]
        assert s.class_counts.get("unlabelled", 0) == labels.count(-1)


def test_same_inputs_give_byte_identical_output_whatever_the_worker_count(tmp_path: Path) -> None:
    fake_pack(tmp_path / "a", workers=1, folds=3)
    fake_pack(tmp_path / "b", workers=1, folds=3)
    fake_pack(tmp_path / "c", workers=2, folds=3)
    first = digests(tmp_path / "a")
    assert MANIFEST in first and len(first) > 3
    assert digests(tmp_path / "b") == first
    assert digests(tmp_path / "c") == first
    fake_pack(tmp_path / "d", workers=1, folds=3, seed=1)
    assert digests(tmp_path / "d") != first


def test_manifest_reads_back_as_written_and_verifies(tmp_path: Path) -> None:
    summary = fake_pack(tmp_path / "out", folds=2)
    assert read_manifest(tmp_path / "out") == summary.manifest
    report = verify_shards(tmp_path / "out")
    assert report.ok and report.samples == summary.manifest.num_ids
    assert report.shards == len(summary.manifest.shards())


def test_folds_go_with_subjects_into_the_metadata(tmp_path: Path) -> None:
    m = fake_pack(tmp_path / "out", subjects=9, frames=3, folds=3).manifest
    fold_of: dict[str, set[int]] = {}
    for sample in read_tars(tmp_path / "out").values():
        meta = json.loads(sample["json"])
        fold_of.setdefault(meta["subject"], set()).add(meta["fold"])
    assert m.folds == 3 and all(len(f) == 1 for f in fold_of.values())
    assert sorted(f for fs in fold_of.values() for f in fs) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_existing_output_is_refused_before_any_work_and_replaced_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake_pack(out, subjects=2)
    LISTED.clear()
    with pytest.raises(FerDistError, match="exists; pass --overwrite"):
        fake_pack(out, subjects=3)
    assert not LISTED
    fake_pack(out, subjects=3, overwrite=True)
    assert read_manifest(out).num_ids == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old folder left


def test_overwrite_refuses_a_folder_that_is_not_a_shard_folder(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(FerDistError, match="not a shard folder"):
        fake_pack(tmp_path / "home", overwrite=True)
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def test_a_failure_midway_leaves_no_output_and_no_temp_folder(tmp_path: Path, monkeypatch) -> None:
    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("fer_dist.data.imagework.align_face", explode)
    with pytest.raises(RuntimeError, match="boom"):
        fake_pack(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_worker_error_propagates_and_leaves_nothing_behind(tmp_path: Path) -> None:
    options = SourceOptions(subjects=4, frames=4, image_size=16, class_map="bug")
    with pytest.raises(ValueError, match="a bug in a loader"):
        pack("fake", [], tmp_path / "out", options=options, workers=2, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_source_fingerprint_depends_on_files_not_on_where_they_live(tmp_path: Path) -> None:
    def fingerprint(root: Path, sizes: dict[str, int], dataset: str = "fake") -> str:
        for rel, size in sizes.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"x" * size)
        listing = Listing([], [], [root / rel for rel in sizes], "none")
        return source_fingerprint(dataset, [root], listing, SourceOptions())["fingerprint"]

    files = {"a/x.png": 5, "b.png": 5}
    here = fingerprint(tmp_path / "one", files)
    assert fingerprint(tmp_path / "two", files) == here
    assert fingerprint(tmp_path / "three", {**files, "b.png": 6}) != here
    assert fingerprint(tmp_path / "four", files, dataset="other") != here


def test_the_jobs_fingerprint_takes_sizes_from_its_reads_and_equals_one_from_stat(tmp_path: Path) -> None:
    root = tmp_path / "faces"
    for n, cls in enumerate(["happy", "sad", "happy"]):
        (root / cls).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / cls / f"{n}.png"), np.full((20 + n, 20), 10 * n, np.uint8))
    (root / "sad" / "bad.png").write_bytes(b"not a png")  # read (its size known), then skipped
    summary = pack("imagefolder", [root], tmp_path / "out", workers=1, progress=False)
    listing = get_source("imagefolder")([root], SourceOptions())
    assert summary.manifest.source == source_fingerprint("imagefolder", [root], listing, SourceOptions())
    assert summary.manifest.source["files"] == 4
    # Sizes given for some files are taken as they are; a file gone since listing counts as size -1.
    (root / "happy" / "0.png").unlink()
    sizes = {str(root / "sad" / "bad.png"): 9}
    again = source_fingerprint("imagefolder", [root], listing, SourceOptions(), sizes)
    assert again != summary.manifest.source
    (root / "happy" / "0.png").write_bytes(b"x" * 10)
    assert source_fingerprint("imagefolder", [root], listing, SourceOptions(), sizes) != again


@pytest.mark.parametrize("doc", [
    {"path": "train/angry/Training_1.jpg", "split": "train", "id": 12, "label": -1, "class": "unlabelled"},
    {"b": 1.5, "a": [1, 2.25, None], "c": {"z": True, "y": False}, "intensity": 0.1 + 0.2, "nan": 1e300},
    {"path": "é/日本/\"quoted\"\n\t.png", "": "", "fold": 0},
])
def test_canonical_json_is_the_standard_encoders_output(doc: dict) -> None:
    expected = json.dumps(doc, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    assert dump_json(doc) == expected
    assert json.loads(dump_json(doc)) == doc


# --- verification: each kind of damage is found and named by shard and sample -------------------------------

def rewrite_tar(path: Path, edit) -> None:
    """Rebuild a tar through `edit(name, data) -> list[(name, data)]` (drop, keep or add members)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            for new_name, new_data in edit(name, data):
                info = tarfile.TarInfo(new_name)
                info.size, info.mode = len(new_data), 0o444
                tar.addfile(info, io.BytesIO(new_data))
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SOURCES, "fake", FAKE_SPEC)
        out = tmp_path_factory.mktemp("verify") / "out"
        fake_pack(out, subjects=6, frames=4, samples_per_shard=5)
    return out


@pytest.fixture()
def damaged(built: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A fresh copy of the built shards and the path of the shard holding id 2 (00000002)."""
    out = tmp_path / "copy"
    out.mkdir()
    for p in built.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out, out / "train-000000.tar"


def first_problem(directory: Path) -> str:
    report = verify_shards(directory)
    assert not report.ok
    return report.problems[0]


def find_member(data: bytes, name: str) -> tuple[int, int]:
    """(offset of the member's data, its size) in a tar's bytes."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.getmember(name)
        return member.offset_data, member.size


@pytest.mark.parametrize("member", ["00000002.png", "00000002.json", "00000002.cls"])
def test_one_changed_byte_inside_a_sample_names_the_shard_and_the_sample(damaged, member: str) -> None:
    out, shard = damaged
    data = bytearray(shard.read_bytes())
    offset, size = find_member(bytes(data), member)
    data[offset + size // 2] ^= 0x01  # json "label":3 -> 2 style edits parse fine: only a digest catches them
    shard.write_bytes(bytes(data))
    problem = first_problem(out)
    assert "train-000000.tar" in problem and "sample 00000002" in problem


@pytest.mark.parametrize("member", ["00000002.json", "00000003.cls"])
def test_one_changed_byte_in_a_tar_header_names_the_sample(damaged, member: str) -> None:
    out, shard = damaged
    data = bytearray(shard.read_bytes())
    offset, _ = find_member(bytes(data), member)
    data[offset - tarfile.BLOCKSIZE + 5] ^= 0x01  # inside the member's name: the header checksum fails
    shard.write_bytes(bytes(data))
    problem = first_problem(out)
    assert "train-000000.tar" in problem and f"sample {member[:8]}: damaged tar header" in problem


def test_truncated_shard_names_the_shard_and_the_sample(damaged) -> None:
    out, shard = damaged
    data = shard.read_bytes()
    offset, size = find_member(data, "00000003.png")
    shard.write_bytes(data[: offset + size // 2])
    problem = first_problem(out)
    assert "train-000000.tar" in problem and "sample 00000003" in problem and "truncated" in problem


@pytest.mark.parametrize(("edit", "messages"), [
    (lambda n, d: [] if n == "00000001.png" else [(n, d)], ["sample 00000001: missing member .png"]),
    (lambda n, d: [(n, d), ("00000004.pyd", b"evil")] if n == "00000004.png" else [(n, d)],
     ["sample 00000004: unexpected member '00000004.pyd'"]),
    (lambda n, d: [] if n.startswith("00000001.") else [(n, d)],
     ["sample 00000001 missing", "holds 4 complete samples, the manifest says 5"]),
])
def test_missing_or_extra_members_and_missing_samples_are_named(damaged, edit, messages: list[str]) -> None:
    out, shard = damaged
    rewrite_tar(shard, edit)
    problems = verify_shards(out).problems
    for message in messages:
        assert any("train-000000.tar" in p and message in p for p in problems), (message, problems)


def test_missing_shard_and_unlisted_tar_are_problems(damaged) -> None:
    out, shard = damaged
    shard.rename(out / "train-000099.tar")
    problems = verify_shards(out).problems
    assert any("train-000000.tar" in p and "missing" in p for p in problems)
    assert any("train-000099.tar" in p and "not listed" in p for p in problems)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.pop("num_ids"), "'num_ids' is missing"),
    (lambda m: m.update(format="fer-dist-shards/0"), "format 'fer-dist-shards/0'"),
    (lambda m: m["splits"]["train"]["shards"][0].update(count="5"), "'splits.train.shards[0].count' should"),
    (lambda m: m["image"].update(size=True), "'image.size' should be an integer"),
    (lambda m: m["splits"]["val"]["shards"][0].update(file="../../etc/x.tar"), "not a tar file name"),
])
def test_bad_manifest_is_a_one_line_error_naming_the_file_and_field(damaged, edit, message: str) -> None:
    out, _ = damaged
    manifest = json.loads((out / MANIFEST).read_text())
    edit(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FerDistError, match="manifest.json") as err:
        read_manifest(out)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_manifest_that_is_not_json_or_absent(tmp_path: Path) -> None:
    with pytest.raises(FerDistError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(FerDistError, match="manifest.json: not valid JSON"):
        read_manifest(tmp_path)


def test_the_shard_count_warning_only_where_loader_workers_would_share(tmp_path: Path) -> None:
    """Issue 14: tiny splits get no warning; a split with enough samples for MIN_SHARDS shards but fewer
    shards does, and says how to get more."""
    small = pack("synthetic", [], tmp_path / "small", options=SourceOptions(subjects=3, frames=3),
                 workers=1, progress=False)
    assert min(len(s.shards) for s in small.manifest.splits.values()) < MIN_SHARDS
    assert small.warnings == []  # tiny splits: their few shards are the default's choice, read in ms
    big = pack("synthetic", [], tmp_path / "big", options=SourceOptions(subjects=30, frames=2, image_size=16),
               size=16, samples_per_shard=MIN_SHARDS * MIN_AUTO_SHARD, workers=1, progress=False)
    train = big.manifest.splits["train"]
    assert train.count >= MIN_SHARDS * MIN_AUTO_SHARD and len(train.shards) < MIN_SHARDS
    assert [w for w in big.warnings if "'train'" in w] == [
        f"split 'train' has {len(train.shards)} shard(s), fewer than {MIN_SHARDS}: loader workers will share "
        "shards (a smaller --samples-per-shard gives more)"]
