"""The 7 expression classes in METHOD.md's order, and every data set's labels mapped onto them.

This is the only module that names labels: sources look their raw labels up here.
"""

from __future__ import annotations

from fer_dist.errors import FerDistError

CLASSES: tuple[str, ...] = ("anger", "disgust", "fear", "happy", "neutral", "sadness", "surprise")
NUM_CLASSES = len(CLASSES)
NEUTRAL = CLASSES.index("neutral")  # first frames of CK+-style sequences
UNLABELLED = -1
UNLABELLED_NAME = "unlabelled"

# FER2013 CSV `emotion` column: 0 Angry, 1 Disgust, 2 Fear, 3 Happy, 4 Sad, 5 Surprise, 6 Neutral.
FER2013_IDS: dict[int, int] = {0: 0, 1: 1, 2: 2, 3: 3, 4: 5, 5: 6, 6: 4}
# FER2013 image-folder names (`train/<class>/...`).
FER2013_FOLDERS: dict[str, int] = {
    "angry": 0, "disgust": 1, "fear": 2, "happy": 3, "neutral": 4, "sad": 5, "surprise": 6,
}
# CK+ emotion files: 0 neutral, 1 anger, 2 contempt, 3 disgust, 4 fear, 5 happy, 6 sadness, 7 surprise.
# Contempt (2) is not one of the 7 classes: None means "leave the sample out".
CKPLUS_IDS: dict[int, int | None] = {0: 4, 1: 0, 2: None, 3: 1, 4: 2, 5: 3, 6: 5, 7: 6}
# RaFD file-name expressions.
RAFD_NAMES: dict[str, int | None] = {
    "angry": 0, "disgusted": 1, "fearful": 2, "happy": 3, "neutral": 4, "sad": 5, "surprised": 6,
    "contemptuous": None,
}
# JAFFE file-name codes (`KA.AN1.39.tiff`).
JAFFE_CODES: dict[str, int] = {"AN": 0, "DI": 1, "FE": 2, "HA": 3, "NE": 4, "SA": 5, "SU": 6}

# Folder names seen in class-folder trees (CK+48, FER2013 folders, hand-made sets). Lower-case keys.
# `None` marks a known class that is not one of the 7 (left out, counted as skipped).
FOLDER_ALIASES: dict[str, int | None] = {
    "anger": 0, "angry": 0, "an": 0,
    "disgust": 1, "disgusted": 1, "di": 1,
    "fear": 2, "fearful": 2, "afraid": 2, "fe": 2,
    "happy": 3, "happiness": 3, "joy": 3, "ha": 3,
    "neutral": 4, "calm": 4, "ne": 4,
    "sadness": 5, "sad": 5, "sa": 5,
    "surprise": 6, "surprised": 6, "su": 6,
    "contempt": None, "contemptuous": None,
}


def class_index(name: str, mapping: dict[str, int | None] = FOLDER_ALIASES, *, where: str = "") -> int | None:
    """Canonical index of a raw class name (case-insensitive); None for a known class outside the 7.

    Raises FerDistError naming `where` for a name the mapping does not know.
    """
    key = name.strip().lower()
    if key not in mapping:
        known = ", ".join(sorted(k for k in mapping if len(k) > 2))
        raise FerDistError(f"{where or name}: unknown class name {name!r} (known: {known})")
    return mapping[key]


def parse_class_map(spec: str) -> dict[str, int | None]:
    """Parse a user's `--class-map` such as `joy=happy,calm=neutral,contempt=skip` into a mapping."""
    mapping = dict(FOLDER_ALIASES)
    for item in filter(None, (s.strip() for s in spec.split(","))):
        raw, sep, target = item.partition("=")
        if not sep:
            raise FerDistError(f"--class-map: {item!r} is not of the form folder=class")
        target = target.strip().lower()
        if target in ("skip", "none"):
            mapping[raw.strip().lower()] = None
        elif target in CLASSES:
            mapping[raw.strip().lower()] = CLASSES.index(target)
        else:
            raise FerDistError(f"--class-map: {target!r} is not one of {', '.join(CLASSES)} or skip")
    return mapping
