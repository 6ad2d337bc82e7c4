"""RaFD: file names `Rafd090_01_Caucasian_female_angry_frontal.jpg` (angle, subject, ethnicity, gender,
expression, gaze), any folder tree; camera angles selectable."""

from __future__ import annotations

import re
from pathlib import Path

from fer_dist.classes import RAFD_NAMES, class_index
from fer_dist.data.sources.base import (
    Listing,
    Record,
    SourceOptions,
    finish,
    image_loader,
    one_src,
    walk_images,
)
from fer_dist.errors import FerDistError

DEFAULT_ALIGN = "haar"
ANGLES: tuple[int, ...] = (0, 45, 90, 135, 180)
EXAMPLE = "Rafd090_01_Caucasian_female_angry_frontal.jpg"
RAFD_NAME = re.compile(
    r"^Rafd(?P<angle>\d{3})_(?P<subject>\d+)_(?P<ethnicity>[A-Za-z]+)_(?P<gender>[A-Za-z]+)_"
    r"(?P<expression>[A-Za-z]+)_(?P<gaze>[A-Za-z]+)\.[A-Za-z]+$",
    re.IGNORECASE,
)


def list_records(src: list[Path], options: SourceOptions | None = None) -> Listing:
    """List RaFD images of the selected camera angles (options.angles, 90 by default)."""
    options = options or SourceOptions()
    bad = [a for a in options.angles if a not in ANGLES]
    if bad or not options.angles:
        known = ", ".join(map(str, ANGLES))
        what = bad[0] if bad else "none given"
        raise FerDistError(f"--angles: {what} is not a RaFD camera angle ({known})")
    root = one_src(src, "rafd")
    walk = walk_images(root)
    records: list[Record] = []
    skipped = list(walk.skipped)
    for rel in walk.images:
        match = RAFD_NAME.match(Path(rel).name)
        if not match:
            skipped.append((rel, f"file name is not a RaFD name (like {EXAMPLE})"))
            continue
        angle = int(match["angle"])
        label = class_index(match["expression"], RAFD_NAMES, where=str(root / rel))
        if angle not in options.angles:
            skipped.append((rel, f"camera angle {angle} not selected (--angles)"))
        elif label is None:
            skipped.append((rel, f"{match['expression'].lower()} is not one of the 7 classes"))
        else:
            meta = {
                "path": rel, "subject": match["subject"], "camera": angle, "gaze": match["gaze"].lower(),
                "gender": match["gender"].lower(), "ethnicity": match["ethnicity"].lower(),
            }
            records.append(Record(rel, label, meta, image_loader(root / rel)))
    if not records:
        angles = ", ".join(map(str, options.angles))
        raise FerDistError(f"{root}: no RaFD images found for camera angles {angles}")
    return finish(records, skipped, [root / r.key for r in records], DEFAULT_ALIGN)
