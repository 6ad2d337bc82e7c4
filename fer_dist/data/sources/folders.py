"""`imagefolder` (`<root>/<class>/*`, names mapped through classes.py) and `unlabelled` (any image tree)."""

from __future__ import annotations

import re
from pathlib import Path

from fer_dist.classes import FOLDER_ALIASES, class_index, parse_class_map
from fer_dist.data.sources.base import (
    Listing,
    Record,
    SourceOptions,
    finish,
    image_loader,
    no_images,
    one_src,
    walk_images,
)

DEFAULT_ALIGN = "haar"
# CK+ frame names (`S010_004_00000017.png`): subject, sequence, 1-based frame number. Class-folder sets cut
# from CK+ (CK+48 and the like) keep these names, which is what subject-independent splits need.
CK_NAME = re.compile(r"^(S\d+)_(?:(\d+)_(\d+)(?=\D|$))?")


def list_records(src: list[Path], options: SourceOptions | None = None) -> Listing:
    """List `<root>/<class>/*`; folder names map through classes.FOLDER_ALIASES or `class_map`."""
    options = options or SourceOptions()
    mapping = parse_class_map(options.class_map) if options.class_map else FOLDER_ALIASES
    return list_class_folders(one_src(src, "imagefolder"), mapping, DEFAULT_ALIGN)


def list_unlabelled(src: list[Path], options: SourceOptions | None = None) -> Listing:
    """List every image under the root as unlabelled."""
    root = one_src(src, "unlabelled")
    walk = walk_images(root)
    if not walk.images:
        raise no_images(root)
    records = [Record(rel, None, {"path": rel}, image_loader(root / rel)) for rel in walk.images]
    return finish(records, walk.skipped, [root / rel for rel in walk.images], DEFAULT_ALIGN)


def list_class_folders(root: Path, mapping: dict[str, int | None], align: str) -> Listing:
    """One record per image in `<root>/<class>/...`; classes mapped to None are skipped, unknown raise."""
    walk = walk_images(root)
    records: list[Record] = []
    skipped = list(walk.skipped)
    labels: dict[str, int | None] = {}
    for rel in walk.images:
        parts = rel.split("/")
        if len(parts) < 2:
            skipped.append((rel, "not inside a class folder"))
            continue
        folder = parts[0]
        if folder not in labels:
            labels[folder] = class_index(folder, mapping, where=str(root / folder))
        label = labels[folder]
        if label is None:
            skipped.append((rel, f"class {folder!r} is left out (not one of the 7 classes)"))
            continue
        meta = {"path": rel, **ck_name_meta(parts[-1])}
        records.append(Record(rel, label, meta, image_loader(root / rel)))
    if not records:
        raise no_images(root, "images in class folders")
    return finish(records, skipped, [root / r.key for r in records], align)


def ck_name_meta(name: str) -> dict:
    """Subject (and sequence and 0-based frame, where present) of a CK-style file name; {} otherwise."""
    match = CK_NAME.match(name)
    if not match:
        return {}
    subject, sequence, frame = match.groups()
    if sequence is None:
        return {"subject": subject}
    meta = {"subject": subject, "sequence": f"{subject}/{sequence}"}
    if int(frame) > 0:  # CK+ numbers frames from 1; a 0 means some other numbering, so no position
        meta["frame"] = int(frame) - 1
    return meta
