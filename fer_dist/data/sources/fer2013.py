"""FER2013: the Kaggle CSV (`emotion,pixels,Usage`) and the image-folder form.

The folder form is `train|test/<class>/<Usage>_<id>.jpg`; the Usage prefix gives the split.
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import numpy as np

from fer_dist.classes import FER2013_FOLDERS, FER2013_IDS, class_index
from fer_dist.data.sources.base import (
    ImageFile,
    ImageReadError,
    Listing,
    Record,
    SourceOptions,
    decode_pixels,
    finish,
    no_images,
    one_src,
    path_prefix,
    walk_images,
)
from fer_dist.errors import FerDistError

DEFAULT_ALIGN = "none"  # FER2013 faces are already cropped and roughly aligned
USAGE_SPLITS: dict[str, str] = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
CSV_COLUMNS: tuple[str, ...] = ("emotion", "pixels", "usage")
# Top-level folders of the image-folder form; a file's Usage prefix, when present, decides its split.
FOLDER_SPLITS: dict[str, str] = {"train": "train", "test": "test", "val": "val", "validation": "val"}


def list_records(src: list[Path], options: SourceOptions | None = None) -> Listing:
    """List FER2013 from the CSV file (or a folder holding one) or from the image-folder form."""
    path = one_src(src, "fer2013")
    if path.is_file():
        return _list_csv(path)
    if any((path / name).is_dir() for name in FOLDER_SPLITS):
        return _list_folders(path)
    csvs = sorted(path.glob("*.csv"))
    if len(csvs) > 1:
        csvs = [p for p in csvs if p.name.lower() == "fer2013.csv"] or csvs
    if len(csvs) == 1:
        return _list_csv(csvs[0])
    if not csvs:
        raise FerDistError(f"{path}: neither a FER2013 CSV nor train/ and test/ class folders")
    raise FerDistError(f"{path}: several CSV files and none named fer2013.csv; give the file itself")


def _list_csv(path: Path) -> Listing:
    """One record per CSV row; the loader seeks to the row's byte offset so no pixels are held in memory."""
    records: list[Record] = []
    with open(path, "rb") as f:
        header = f.readline()
        columns = _check_columns(path, header)
        offset = len(header)
        row = 0
        for line in f:
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            fields = _parse_line(line)
            where = f"{path}#{row}"
            if len(fields) != len(CSV_COLUMNS):
                raise FerDistError(f"{where}: {len(fields)} fields, expected {len(CSV_COLUMNS)}")
            label = _emotion(fields[columns["emotion"]], where)
            usage = fields[columns["usage"]].strip()
            if usage not in USAGE_SPLITS:
                raise FerDistError(f"{where}: unknown Usage {usage!r} (known: {', '.join(USAGE_SPLITS)})")
            load = functools.partial(read_csv_pixels, str(path), start, columns["pixels"], where)
            meta = {"path": path.name, "row": row, "split": USAGE_SPLITS[usage]}
            records.append(Record(f"{path.name}#{row}", label, meta, load))
            row += 1
    if not records:
        raise FerDistError(f"{path}: the CSV has a header but no rows")
    return finish(records, [], [path], DEFAULT_ALIGN)


def _parse_line(line: bytes, encoding: str = "utf-8") -> list[str]:
    """The fields of one CSV line (csv handles quoted fields, which some exports write)."""
    return next(csv.reader([line.decode(encoding, errors="replace").rstrip("\r\n")]), [])


def _check_columns(path: Path, header: bytes) -> dict[str, int]:
    """Column positions by name; a one-line error naming the missing and unexpected columns otherwise."""
    names = [c.strip() for c in _parse_line(header, "utf-8-sig")]
    lowered = [n.lower() for n in names]
    missing = [c for c in CSV_COLUMNS if c not in lowered]
    unexpected = [n for n, low in zip(names, lowered, strict=True) if low not in CSV_COLUMNS]
    if missing or unexpected or len(set(lowered)) != len(lowered):
        parts = [f"missing {', '.join(missing)}" if missing else "", f"unexpected {', '.join(unexpected)}"
                 if unexpected else ""]
        detail = "; ".join(p for p in parts if p) or "repeated columns"
        raise FerDistError(f"{path}: not a FER2013 CSV (expected columns emotion,pixels,Usage: {detail})")
    return {name: lowered.index(name) for name in CSV_COLUMNS}


def _emotion(value: str, where: str) -> int:
    """The canonical class of a FER2013 emotion id."""
    try:
        emotion = int(value.strip())
    except ValueError:
        emotion = -1
    if emotion not in FER2013_IDS:
        raise FerDistError(f"{where}: emotion {value.strip()!r} is not a FER2013 id (0-6)")
    return FER2013_IDS[emotion]


def read_csv_pixels(path: str, offset: int, column: int, where: str) -> np.ndarray:
    """Read one CSV row at a byte offset and decode its 48x48 pixel string."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline()
    except OSError as exc:
        raise ImageReadError(where, f"cannot read ({exc.strerror or exc})") from None
    fields = _parse_line(line)
    if len(fields) <= column:
        raise ImageReadError(where, "row has changed since listing")
    return decode_pixels(fields[column], where)


def _list_folders(root: Path) -> Listing:
    """The image-folder form: `<split>/<class>/<Usage>_<id>.jpg`."""
    walk = walk_images(root)
    records: list[Record] = []
    skipped = list(walk.skipped)
    # Strings, not Paths, and each folder checked once: this loop runs once per image.
    prefix = path_prefix(root)
    folders: dict[str, tuple[int | None, str] | None] = {}  # folder -> (label, split); None: too shallow
    files: list[str] = []
    for rel in walk.images:
        cut = rel.rfind("/")
        here = rel[:cut] if cut > 0 else ""
        folder = folders.get(here, False)
        if folder is False:
            folder = folders[here] = _folder(root, here.split("/"))
        if folder is None:
            skipped.append((rel, "not inside a <split>/<class>/ folder"))
            continue
        label, split = folder
        split = USAGE_SPLITS.get(rel[cut + 1 :].partition("_")[0], split)  # the Usage prefix decides
        path = prefix + rel
        records.append(Record(rel, label, {"path": rel, "split": split}, ImageFile(path)))
        files.append(path)
    if not records:
        raise no_images(root)
    return finish(records, skipped, files, DEFAULT_ALIGN)


def _folder(root: Path, parts: list[str]) -> tuple[int | None, str] | None:
    """The label of a `<split>/<class>[/...]` folder and the split its files take without a Usage prefix."""
    if len(parts) < 2:
        return None
    if parts[0].lower() not in FOLDER_SPLITS:
        known = ", ".join(FOLDER_SPLITS)
        raise FerDistError(f"{root / parts[0]}: unknown FER2013 split folder {parts[0]!r} (known: {known})")
    label = class_index(parts[1], FER2013_FOLDERS, where=str(root / parts[0] / parts[1]))
    return label, FOLDER_SPLITS[parts[0].lower()]
