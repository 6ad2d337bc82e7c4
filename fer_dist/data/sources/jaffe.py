"""JAFFE: file names `KA.AN1.39.tiff` (subject initials, expression code and take, image number)."""

from __future__ import annotations

import re
from pathlib import Path

from fer_dist.classes import JAFFE_CODES
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
from fer_dist.errors import FerDistError

DEFAULT_ALIGN = "haar"
JAFFE_NAME = re.compile(
    r"^(?P<subject>[A-Z]{2})\.(?P<code>[A-Z]{2})(?P<take>\d+)\.(?P<number>\d+)\.[A-Za-z]+$"
)


def list_records(src: list[Path], options: SourceOptions | None = None) -> Listing:
    """List JAFFE images; files whose names are not JAFFE names (README, .DS_Store) are skipped."""
    root = one_src(src, "jaffe")
    walk = walk_images(root)
    records: list[Record] = []
    skipped = list(walk.skipped)
    for rel in walk.images:
        match = JAFFE_NAME.match(Path(rel).name)
        if not match:
            skipped.append((rel, "file name is not a JAFFE name (KA.AN1.39.tiff)"))
            continue
        code = match["code"]
        if code not in JAFFE_CODES:
            # classes.class_index lower-cases names, and JAFFE's codes are upper-case: look them up here.
            known = ", ".join(JAFFE_CODES)
            raise FerDistError(f"{root / rel}: unknown JAFFE expression code {code!r} (known: {known})")
        meta = {"path": rel, "subject": match["subject"], "take": int(match["take"]),
                "number": int(match["number"])}
        records.append(Record(rel, JAFFE_CODES[code], meta, image_loader(root / rel)))
    if not records:
        raise no_images(root, "JAFFE images")
    return finish(records, skipped, [root / r.key for r in records], DEFAULT_ALIGN)
