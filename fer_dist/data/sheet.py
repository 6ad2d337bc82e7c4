"""A contact sheet of random faces, a row per class (unlabelled last), for a person to look at.

One pass over the shards keeps a seeded reservoir of `per_class` samples per class, so any class is sampled
uniformly without holding the data set in memory; only the kept faces are decoded.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import cv2
import numpy as np

from fer_dist.classes import CLASSES, UNLABELLED, UNLABELLED_NAME
from fer_dist.data.manifest import read_manifest
from fer_dist.errors import FerDistError
from fer_dist.outputs import tag_image

TILE = 96  # pixels per face on the sheet: 48-pixel faces are too small to judge at 1:1
LABEL_W = 170
CAPTION_H = 14
FONT = cv2.FONT_HERSHEY_SIMPLEX
SUFFIXES = (".png", ".jpg", ".jpeg")


def sample_faces(directory: Path, per_class: int, seed: int = 0) -> dict[str, list[tuple[int, bytes]]]:
    """Up to `per_class` (id, png bytes) per class name drawn uniformly at random, ids ascending."""
    manifest = read_manifest(directory)
    rng = np.random.default_rng(seed)
    kept: dict[str, list[tuple[int, bytes]]] = {}
    seen: dict[str, int] = {}
    for _, info in manifest.shards():
        with tarfile.open(Path(directory) / info.file, mode="r:") as tar:
            name = None
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "cls":
                    label = int(tar.extractfile(member).read())  # type: ignore[union-attr]
                    name = UNLABELLED_NAME if label == UNLABELLED else CLASSES[label]
                elif ext == "png" and name is not None:  # members come cls, json, png per sample
                    # Reservoir sampling (Algorithm R): the n-th face replaces a kept one with chance k/n.
                    seen[name] = n = seen.get(name, 0) + 1
                    slot = n - 1 if n <= per_class else int(rng.integers(n))
                    if slot < per_class:
                        entry = (int(key), tar.extractfile(member).read())  # type: ignore[union-attr]
                        row = kept.setdefault(name, [])
                        if slot == len(row):
                            row.append(entry)
                        else:
                            row[slot] = entry
                    name = None
    return {c: sorted(kept[c]) for c in (*CLASSES, UNLABELLED_NAME) if c in kept}


def render_sheet(rows: dict[str, list[tuple[int, bytes]]], counts: dict[str, int], title: str,
                 per_class: int) -> np.ndarray:
    """The sheet as a BGR image: a caption column (class and count), then the faces with their ids."""
    row_h = TILE + CAPTION_H
    height, width = 30 + row_h * max(1, len(rows)), LABEL_W + per_class * (TILE + 4)
    sheet = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(sheet, title, (6, 20), FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for r, (name, faces) in enumerate(rows.items()):
        top = 30 + r * row_h
        cv2.putText(sheet, name, (6, top + TILE // 2), FONT, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(sheet, f"{counts.get(name, 0)} in all", (6, top + TILE // 2 + 18), FONT, 0.4,
                    (90, 90, 90), 1, cv2.LINE_AA)
        for c, (sample_id, png) in enumerate(faces):
            face = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)  # grey: 3 equal channels
            if face is None:
                raise FerDistError(f"sample {sample_id:08d}: its PNG does not decode")
            left = LABEL_W + c * (TILE + 4)
            sheet[top : top + TILE, left : left + TILE] = cv2.resize(face, (TILE, TILE),
                                                                     interpolation=cv2.INTER_NEAREST)
            cv2.putText(sheet, f"{sample_id}", (left + 2, top + TILE + 11), FONT, 0.33, (90, 90, 90), 1,
                        cv2.LINE_AA)
    return sheet


def check_sheet_path(out: Path, per_class: int) -> None:
    """The sheet's name and size, checked before any work."""
    if Path(out).suffix.lower() not in SUFFIXES:
        raise FerDistError(f"--sheet: {out} should end in .png or .jpg")
    if per_class < 1:
        raise FerDistError(f"--per-class: must be at least 1, got {per_class}")


def contact_sheet(directory: Path, out: Path, *, per_class: int = 8, seed: int = 0,
                  suffix: str | None = None) -> Path:
    """Write a contact sheet of random faces per class to `out` (.png or .jpg, else `suffix`'s format),
    atomically, tagged as fer-dist's (`outputs.tag_image`: `inspect --overwrite` replaces only such)."""
    out = Path(out)
    suffix = (suffix or out.suffix).lower()
    check_sheet_path(Path(f"sheet{suffix}"), per_class)
    manifest = read_manifest(directory)
    counts: dict[str, int] = {}
    for split in manifest.splits.values():
        for name, n in split.class_counts.items():
            counts[name] = counts.get(name, 0) + n
    rows = sample_faces(directory, per_class, seed)
    title = f"{manifest.dataset}: {per_class} random faces per class (seed {seed}), id under each face"
    ok, data = cv2.imencode(suffix, render_sheet(rows, counts, title, per_class))
    if not ok:
        raise FerDistError(f"--sheet: {out}: OpenCV could not encode the sheet")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(tag_image(data.tobytes(), suffix))
        os.replace(tmp, out)  # a reader never sees half a sheet
    finally:
        tmp.unlink(missing_ok=True)
    return out
