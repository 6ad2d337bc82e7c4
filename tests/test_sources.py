"""Sources: each published layout, built tiny in a tmp dir, listed to exact labels, splits and metadata."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from layouts import (
    make_ck48,
    make_ckplus,
    make_fer2013_csv,
    make_fer2013_folders,
    make_imagefolder,
    make_jaffe,
    make_rafd,
    make_unlabelled,
    pixels,
    rafd_name,
    write_image,
)
from PIL import Image

from fer_dist.classes import CLASSES
from fer_dist.data.sources import SOURCES, ImageReadError, Listing, SourceOptions, get_source
from fer_dist.data.sources.base import IMAGE_EXTENSIONS, is_image, read_image
from fer_dist.errors import FerDistError

SHARED_FER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fer2013"
FILE_SOURCES = [name for name, spec in SOURCES.items() if spec.needs_src]


def listing(source: str, *src: Path, **options) -> Listing:
    return get_source(source)(list(src), SourceOptions(**options))


def names(records) -> list[str | None]:
    return [None if r.label is None else CLASSES[r.label] for r in records]


def one_line_error(exc: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(exc.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


def check_listing(result: Listing) -> None:
    """What every listing promises: sorted unique keys, `path` in meta, JSON-able meta, picklable loaders."""
    keys = [r.key for r in result.records]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for record in result.records:
        assert "path" in record.meta
        json.dumps(record.meta)
        assert record.label is None or 0 <= record.label < len(CLASSES)
    clone = pickle.loads(pickle.dumps(result.records[0]))
    image = clone.load()
    assert image.dtype == np.uint8 and image.ndim in (2, 3)
    np.testing.assert_array_equal(image, result.records[0].load())


# --- FER2013 -------------------------------------------------------------------------------------------

def test_fer2013_csv(tmp_path: Path) -> None:
    csv_path = make_fer2013_csv(tmp_path / "fer2013.csv")
    result = listing("fer2013", csv_path)
    check_listing(result)
    assert [r.key for r in result.records] == [f"fer2013.csv#{i}" for i in range(5)]
    assert names(result.records) == ["anger", "happy", "neutral", "sadness", "disgust"]
    assert [r.meta["split"] for r in result.records] == ["train", "train", "val", "test", "test"]
    assert result.records[3].meta == {"path": "fer2013.csv", "row": 3, "split": "test"}
    assert "subject" not in result.records[0].meta
    assert result.files == [csv_path] and result.skipped == [] and result.default_align == "none"
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(result.records[3])).load(), pixels(3, (48, 48)))
    # The folder holding the CSV lists the same rows.
    assert [r.key for r in listing("fer2013", tmp_path).records] == [r.key for r in result.records]


def test_fer2013_csv_any_column_order_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "icml_face_data.csv"
    path.write_bytes(("emotion, Usage, pixels\r\n3,Training," + " ".join(["7"] * 2304) + "\r\n").encode())
    (record,) = listing("fer2013", path).records
    assert record.label == CLASSES.index("happy") and record.meta["split"] == "train"
    assert (record.load() == 7).all()


@pytest.mark.parametrize(
    ("header", "expected"),
    [("emotion,pixels", "missing usage"), ("emotion,pixels,Usage,extra", "unexpected extra"),
     ("label,pixels,Usage", "missing emotion; unexpected label")],
)
def test_fer2013_csv_other_columns(tmp_path: Path, header: str, expected: str) -> None:
    path = tmp_path / "fer2013.csv"
    path.write_text(header + "\n0,1 2 3,Training\n")
    with pytest.raises(FerDistError) as exc:
        listing("fer2013", path)
    one_line_error(exc, str(path), expected)


def test_fer2013_csv_bad_rows(tmp_path: Path) -> None:
    path = make_fer2013_csv(tmp_path / "fer2013.csv", rows=((0, "Training"), (9, "Training")))
    with pytest.raises(FerDistError) as exc:
        listing("fer2013", path)
    one_line_error(exc, f"{path}#1", "'9'")
    path = make_fer2013_csv(tmp_path / "fer2013.csv", rows=((0, "Training"), (0, "Validation")))
    with pytest.raises(FerDistError) as exc:
        listing("fer2013", path)
    one_line_error(exc, f"{path}#1", "Validation")


def test_fer2013_csv_bad_pixels_fail_at_load(tmp_path: Path) -> None:
    path = tmp_path / "fer2013.csv"
    good = " ".join(["1"] * 2304)
    path.write_text(f"emotion,pixels,Usage\n0,{good},Training\n0,{' '.join(['1'] * 2303)},Training\n"
                    f"0,{good[:-1]}x,Training\n0,{good[:-1]}256,Training\n")
    records = listing("fer2013", path).records
    assert records[0].load().shape == (48, 48)
    reasons = ("2303 pixel values, expected 2304", "not all integers", "outside 0..255")
    for row, reason in enumerate(reasons, start=1):
        with pytest.raises(ImageReadError) as exc:
            records[row].load()
        one_line_error(exc, f"{path}#{row}", reason)


def test_fer2013_folders(tmp_path: Path) -> None:
    result = listing("fer2013", make_fer2013_folders(tmp_path))
    check_listing(result)
    by_key = {r.key: r for r in result.records}
    assert sorted(by_key) == sorted([
        "train/angry/Training_10118481.jpg", "train/happy/Training_2.jpg", "test/neutral/PublicTest_3.jpg",
        "test/sad/PrivateTest_4.jpg", "test/surprise/PrivateTest_5.jpg"])
    assert names(result.records) == ["neutral", "sadness", "surprise", "anger", "happy"]
    assert [r.meta["split"] for r in result.records] == ["val", "test", "test", "train", "train"]
    sad = "test/sad/PrivateTest_4.jpg"
    assert by_key[sad].meta == {"path": sad, "split": "test"}
    assert result.skipped == [("README.md", "not an image")]
    assert len(result.files) == 5 and result.default_align == "none"
    assert by_key["train/happy/Training_2.jpg"].load().shape == (48, 48)


def test_fer2013_folders_unknown_class_and_split(tmp_path: Path) -> None:
    make_fer2013_folders(tmp_path / "a")
    write_image(tmp_path / "a" / "train" / "smirk" / "Training_9.jpg", pixels(0))
    with pytest.raises(FerDistError) as exc:
        listing("fer2013", tmp_path / "a")
    one_line_error(exc, str(tmp_path / "a" / "train" / "smirk"), "'smirk'")
    make_fer2013_folders(tmp_path / "b")
    write_image(tmp_path / "b" / "extra" / "happy" / "Training_9.jpg", pixels(0))
    with pytest.raises(FerDistError) as exc:
        listing("fer2013", tmp_path / "b")
    one_line_error(exc, str(tmp_path / "b" / "extra"), "split folder")


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_FER.is_dir(), reason="../shared/data/fer2013 is absent")
def test_fer2013_real_folders() -> None:
    result = listing("fer2013", SHARED_FER)
    counts = {s: sum(r.meta["split"] == s for r in result.records) for s in ("train", "val", "test")}
    assert counts == {"train": 28709, "val": 3589, "test": 3589}
    assert result.records[0].load().shape == (48, 48)


# --- CK+ -----------------------------------------------------------------------------------------------

def ck_table(result: Listing) -> list[tuple]:
    return [(r.meta["sequence"], r.meta["frame"], r.meta["seq_len"], name)
            for r, name in zip(result.records, names(result.records), strict=True)]


def test_ckplus_official_peak_frames_3(tmp_path: Path) -> None:
    root = make_ckplus(tmp_path)
    result = listing("ckplus", root, peak_frames=3)
    check_listing(result)
    assert ck_table(result) == [
        ("S005/001", 0, 5, "neutral"), ("S005/001", 1, 5, None), ("S005/001", 2, 5, "happy"),
        ("S005/001", 3, 5, "happy"), ("S005/001", 4, 5, "happy"),
        ("S005/002", 0, 4, "neutral"), ("S005/002", 1, 4, None), ("S005/002", 2, 4, None),
        ("S005/002", 3, 4, None),
        ("S010/002", 0, 3, "neutral"), ("S010/002", 1, 3, "surprise"), ("S010/002", 2, 3, "surprise"),
    ]
    first = result.records[0]
    assert first.key == "cohn-kanade-images/S005/001/S005_001_00000001.png"
    assert first.meta == {"path": first.key, "subject": "S005", "sequence": "S005/001", "frame": 0,
                          "seq_len": 5, "expression": CLASSES.index("happy")}
    assert "expression" not in result.records[5].meta  # no emotion file: the sequence's class is unknown
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(result.records[4])).load(), pixels(5))
    assert result.skipped == [
        ("cohn-kanade-images/S005/001/.DS_Store", "hidden file"),
        ("cohn-kanade-images/S010/001", "contempt sequence (not one of the 7 classes)"),
    ]
    assert len(result.files) == 12 + 3  # the frames listed and the three emotion files read
    assert result.default_align == "haar"


def test_ckplus_official_peak_frames_1_and_two_src(tmp_path: Path) -> None:
    root = make_ckplus(tmp_path)
    one = listing("ckplus", root)
    assert names(one.records) == [
        "neutral", None, None, None, "happy", "neutral", None, None, None, "neutral", None, "surprise"]
    two = listing("ckplus", root / "Emotion", root / "cohn-kanade-images")
    assert [(r.key, r.label, r.meta) for r in two.records] == [(r.key, r.label, r.meta) for r in one.records]
    assert listing("ckplus", root / "cohn-kanade-images").skipped == one.skipped  # Emotion found beside it


def test_ckplus_frames_sorted_by_number(tmp_path: Path) -> None:
    root = make_ckplus(tmp_path, {"S001/001": (2, 3)})
    folder = root / "cohn-kanade-images" / "S001" / "001"
    (folder / "S001_001_00000002.png").rename(folder / "S001_001_00000010.png")
    write_image(folder / "S001_001_00000009.png", pixels(7))
    result = listing("ckplus", root)
    assert [Path(r.key).name for r in result.records] == [
        "S001_001_00000001.png", "S001_001_00000009.png", "S001_001_00000010.png"]
    assert names(result.records) == ["neutral", None, "disgust"]


def test_ckplus_bad_inputs(tmp_path: Path) -> None:
    root = make_ckplus(tmp_path / "a")
    bad = root / "Emotion" / "S005" / "001" / "S005_001_00000005_emotion.txt"
    bad.write_text("happy\n")
    with pytest.raises(FerDistError) as exc:
        listing("ckplus", root)
    one_line_error(exc, str(bad), "not a CK+ emotion label")
    bad.write_text("   9.0000000e+00\n")
    with pytest.raises(FerDistError) as exc:
        listing("ckplus", root)
    one_line_error(exc, str(bad), "'9.0000000e+00'")
    lone = make_ckplus(tmp_path / "b")
    (lone / "Emotion").rename(tmp_path / "b" / "labels")
    with pytest.raises(FerDistError) as exc:
        listing("ckplus", lone)
    one_line_error(exc, str(lone / "cohn-kanade-images"), "no Emotion folder")
    with pytest.raises(FerDistError) as exc:
        listing("ckplus", root, peak_frames=0)
    one_line_error(exc, "--peak-frames")


def test_ck48(tmp_path: Path) -> None:
    result = listing("ckplus", make_ck48(tmp_path))
    check_listing(result)
    assert [r.key for r in result.records] == [
        "anger/S010_004_00000017.png", "anger/S010_004_00000018.png", "happy/S011_006_00000012.png",
        "surprise/S022_001_00000030.png"]
    assert names(result.records) == ["anger", "anger", "happy", "surprise"]
    assert result.records[1].meta == {"path": "anger/S010_004_00000018.png", "subject": "S010",
                                      "sequence": "S010/004", "frame": 17}
    assert result.skipped == [("contempt/S138_008_00000007.png", "class 'contempt' is left out "
                                                                "(not one of the 7 classes)")]
    np.testing.assert_array_equal(result.records[2].load(), pixels(20, (48, 48)))
    (tmp_path / "bored").mkdir()
    write_image(tmp_path / "bored" / "S001_001_00000001.png", pixels(0))
    with pytest.raises(FerDistError) as exc:
        listing("ckplus", tmp_path)
    one_line_error(exc, str(tmp_path / "bored"), "'bored'")


# --- RaFD and JAFFE ------------------------------------------------------------------------------------

def test_rafd_default_angle(tmp_path: Path) -> None:
    result = listing("rafd", make_rafd(tmp_path))
    check_listing(result)
    expected = sorted(f"RafDDownload-1/{rafd_name(90, s, e, g)}" for s in ("01", "02")
                      for e in ("angry", "happy") for g in ("frontal", "left"))
    assert [r.key for r in result.records] == expected
    assert names(result.records) == ["anger", "anger", "happy", "happy"] * 2
    assert result.records[1].meta == {"path": expected[1], "subject": "01", "camera": 90, "gaze": "left",
                                      "gender": "female", "ethnicity": "caucasian"}
    assert result.records[0].load().shape == (12, 16, 3)
    reasons = [reason for _, reason in result.skipped]
    assert reasons.count("camera angle 45 not selected (--angles)") == 12
    assert reasons.count("camera angle 135 not selected (--angles)") == 12
    assert reasons.count("contemptuous is not one of the 7 classes") == 4
    assert ("RafDDownload-1/Thumbs.db", "not an image") in result.skipped
    assert any(p == "RafDDownload-1/thumbnail.jpg" and "not a RaFD name" in r for p, r in result.skipped)
    assert len(result.skipped) == 12 + 12 + 4 + 2


def test_rafd_angles(tmp_path: Path) -> None:
    result = listing("rafd", make_rafd(tmp_path), angles=(45, 135))
    assert sorted({r.meta["camera"] for r in result.records}) == [45, 135] and len(result.records) == 16
    with pytest.raises(FerDistError) as exc:
        listing("rafd", tmp_path, angles=(30,))
    one_line_error(exc, "--angles", "30")
    with pytest.raises(FerDistError) as exc:
        listing("rafd", tmp_path, angles=(0,))
    one_line_error(exc, str(tmp_path), "camera angles 0")


def test_jaffe_palette_tiffs(tmp_path: Path) -> None:
    root = make_jaffe(tmp_path)
    assert Image.open(root / "KA.AN1.39.tiff").mode == "P"
    result = listing("jaffe", root)
    check_listing(result)
    assert [r.key for r in result.records] == ["KA.AN1.39.tiff", "KA.HA2.44.tiff", "KM.NE1.1.tiff",
                                               "YM.SU3.60.tiff"]
    assert names(result.records) == ["anger", "happy", "neutral", "surprise"]
    assert result.records[3].meta == {"path": "YM.SU3.60.tiff", "subject": "YM", "take": 3, "number": 60}
    assert result.skipped == [(".DS_Store", "hidden file"), ("README", "not an image")]
    for i, record in enumerate(result.records):
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(record)).load(), pixels(i))  # grey, exact
    Image.fromarray(pixels(0), "L").save(root / "KA.XX1.40.tiff")
    with pytest.raises(FerDistError) as exc:
        listing("jaffe", root)
    one_line_error(exc, str(root / "KA.XX1.40.tiff"), "'XX'")


# --- imagefolder and unlabelled ------------------------------------------------------------------------

def test_imagefolder(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path)
    result = listing("imagefolder", root)
    check_listing(result)
    assert [(r.key, CLASSES[r.label]) for r in result.records] == [
        ("calm/S011_002_00000003.png", "neutral"), ("joy/a.png", "happy"), ("joy/b.PNG", "happy")]
    assert result.records[0].meta == {"path": "calm/S011_002_00000003.png", "subject": "S011",
                                      "sequence": "S011/002", "frame": 2}
    assert result.records[1].meta == {"path": "joy/a.png"}
    assert result.skipped == [("contempt/c.png", "class 'contempt' is left out (not one of the 7 classes)"),
                              ("notes.txt", "not an image")]
    mapped = listing("imagefolder", root, class_map="joy=surprise,contempt=happy")
    assert names(mapped.records) == ["neutral", "happy", "surprise", "surprise"]
    write_image(root / "smirk" / "d.png", pixels(5))
    with pytest.raises(FerDistError) as exc:
        listing("imagefolder", root)
    one_line_error(exc, str(root / "smirk"), "'smirk'")
    assert len(listing("imagefolder", root, class_map="smirk=happy").records) == 4


def test_unlabelled(tmp_path: Path) -> None:
    result = listing("unlabelled", make_unlabelled(tmp_path))
    check_listing(result)
    assert [(r.key, r.label, r.meta) for r in result.records] == [
        ("a/b/c.png", None, {"path": "a/b/c.png"}), ("x.jpg", None, {"path": "x.jpg"})]
    assert result.skipped == [("__MACOSX", "hidden or system folder"), ("y.txt", "not an image")]
    assert result.files == [tmp_path / "a" / "b" / "c.png", tmp_path / "x.jpg"]
    np.testing.assert_array_equal(result.records[0].load(), pixels(1))


# --- bad input common to all sources -------------------------------------------------------------------

@pytest.mark.parametrize("source", FILE_SOURCES)
def test_missing_path(tmp_path: Path, source: str) -> None:
    with pytest.raises(FerDistError) as exc:
        listing(source, tmp_path / "nope")
    one_line_error(exc, str(tmp_path / "nope"), "no such file or folder")


@pytest.mark.parametrize("source", FILE_SOURCES)
def test_empty_folder(tmp_path: Path, source: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing here\n")
    with pytest.raises(FerDistError) as exc:
        listing(source, tmp_path / "empty")
    one_line_error(exc, str(tmp_path / "empty"))


@pytest.mark.parametrize("source", [s for s in FILE_SOURCES if s != "ckplus"])
def test_one_root_sources_refuse_two_paths(tmp_path: Path, source: str) -> None:
    with pytest.raises(FerDistError) as exc:
        listing(source, tmp_path, tmp_path)
    one_line_error(exc, "--src", "got 2")


@pytest.mark.parametrize(
    ("source", "make", "rel"),
    [("fer2013", make_fer2013_folders, "train/angry/Training_10118481.jpg"),
     ("ckplus", make_ckplus, "cohn-kanade-images/S005/002/S005_002_00000002.png"),
     ("rafd", make_rafd, "RafDDownload-1/" + rafd_name(90, "01", "angry")),
     ("jaffe", make_jaffe, "KA.AN1.39.tiff"), ("imagefolder", make_imagefolder, "joy/a.png"),
     ("unlabelled", make_unlabelled, "x.jpg")],
)
def test_corrupt_image_fails_at_load(tmp_path: Path, source: str, make, rel: str) -> None:
    make(tmp_path)
    (tmp_path / rel).write_bytes(b"\xff\xd8 this is not really an image")
    (record,) = [r for r in listing(source, tmp_path).records if r.key == rel]
    with pytest.raises(ImageReadError) as exc:
        pickle.loads(pickle.dumps(record)).load()
    one_line_error(exc, str(tmp_path / rel), "not a readable image")


def test_unknown_source() -> None:
    with pytest.raises(FerDistError) as exc:
        get_source("affectnet")
    one_line_error(exc, "'affectnet'", "fer2013", "ckplus", "synthetic")


def test_registry() -> None:
    assert {n: s.default_align for n, s in SOURCES.items()} == {
        "fer2013": "none", "ckplus": "haar", "rafd": "haar", "jaffe": "haar", "imagefolder": "haar",
        "unlabelled": "haar", "synthetic": "none"}
    assert [n for n, s in SOURCES.items() if s.official_splits] == ["fer2013"]
    assert [n for n, s in SOURCES.items() if not s.needs_src] == ["synthetic"]
    assert get_source("unlabelled").__name__ == "list_unlabelled"


# --- the image reader ----------------------------------------------------------------------------------

def test_read_image_formats(tmp_path: Path) -> None:
    grey, rgb = pixels(1), pixels(2, (12, 16, 3))
    np.testing.assert_array_equal(read_image(str(write_image(tmp_path / "g.PGM", grey))), grey)
    np.testing.assert_array_equal(read_image(str(write_image(tmp_path / "c.png", rgb[..., ::-1]))), rgb)
    rgba = np.dstack([rgb[..., ::-1], np.full((12, 16), 7, np.uint8)])
    np.testing.assert_array_equal(read_image(str(write_image(tmp_path / "a.png", rgba))), rgb)
    deep = write_image(tmp_path / "d.png", grey.astype(np.uint16) * 257)
    np.testing.assert_array_equal(read_image(str(deep)), grey)
    colourless = write_image(tmp_path / "e.png", np.dstack([grey] * 3))
    np.testing.assert_array_equal(read_image(str(colourless)), grey)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.tiff")
    assert read_image(str(tmp_path / "p.tiff")).shape == (12, 16, 3)
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "f.tiff")
    np.testing.assert_array_equal(read_image(str(tmp_path / "f.tiff")), grey)


def test_read_image_falls_back_to_pil(tmp_path: Path) -> None:
    grey = pixels(3)
    path = tmp_path / "g.tif"
    Image.fromarray(grey, "L").save(path, format="PCX")  # misnamed PCX bytes: OpenCV cannot decode them
    assert cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED) is None
    np.testing.assert_array_equal(read_image(str(path)), grey)


@pytest.mark.parametrize(("content", "reason"), [(b"", "empty file"), (b"hello", "not a readable image")])
def test_read_image_errors(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as exc:
        read_image(str(path))
    one_line_error(exc, str(path), reason)
    clone = pickle.loads(pickle.dumps(exc.value))  # pool workers send it back pickled
    assert (clone.path, clone.reason, str(clone)) == (str(path), exc.value.reason, str(exc.value))


def test_read_image_truncated_and_missing(tmp_path: Path) -> None:
    data = cv2.imencode(".png", pixels(4, (64, 64)))[1].tobytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as exc:
        read_image(str(tmp_path / "t.png"))
    one_line_error(exc, str(tmp_path / "t.png"))
    with pytest.raises(ImageReadError) as exc:
        read_image(str(tmp_path / "gone.png"))
    one_line_error(exc, str(tmp_path / "gone.png"), "cannot read")


@pytest.mark.parametrize("name", ["a.png", "A.JPG", "x.tar.gz", "x.jpeg.txt", ".png", "..png", ".a.png", "a.",
                                  "noext", "a..tiff", ".hidden.PGM", "...", "a.b.c.webp", "dir.png.bak"])
def test_is_image_agrees_with_splitext(name: str) -> None:
    assert is_image(name) == (os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)
