"""CK+: the official layout (image sequences + Emotion files) and the CK+48 class-folder form."""

from __future__ import annotations

import re
from pathlib import Path

from fer_dist.classes import CKPLUS_IDS, FOLDER_ALIASES, NEUTRAL
from fer_dist.data.sources.base import (
    Listing,
    Record,
    SourceOptions,
    existing,
    finish,
    image_loader,
    no_images,
    walk_images,
)
from fer_dist.data.sources.folders import list_class_folders
from fer_dist.errors import FerDistError

DEFAULT_ALIGN = "haar"
IMAGES_DIR = "cohn-kanade-images"
EMOTION_DIR = "Emotion"
SUBJECT_DIR = re.compile(r"^S\d+$")
TRAILING_NUMBER = re.compile(r"(\d+)\D*$")


def list_records(src: list[Path], options: SourceOptions | None = None) -> Listing:
    """List CK+ from its official root (or its two folders given apart), or from CK+48 class folders."""
    options = options or SourceOptions()
    if options.peak_frames < 1:
        raise FerDistError(f"--peak-frames: must be at least 1, got {options.peak_frames}")
    if not 1 <= len(src) <= 2:
        raise FerDistError(f"--src: the ckplus source takes one root or {IMAGES_DIR} and {EMOTION_DIR}, "
                           f"got {len(src)} paths")
    paths = [existing(p) for p in src]
    dirs = _official_dirs(paths)
    if dirs is not None:
        return _list_official(*dirs, options.peak_frames)
    if len(paths) != 1:
        raise FerDistError(f"{paths[0]}: two --src paths must be the {IMAGES_DIR} and {EMOTION_DIR} folders")
    # CK+48 names its folders anger, contempt, ...: the shared aliases cover them, contempt included.
    return list_class_folders(paths[0], FOLDER_ALIASES, DEFAULT_ALIGN)


def _official_dirs(paths: list[Path]) -> tuple[Path, Path] | None:
    """The images and Emotion folders of the official layout, or None when the paths hold neither."""
    found: dict[str, Path] = {}
    for path in paths:
        for role, where in _roles(path).items():
            if role in found and found[role] != where:
                raise FerDistError(f"{where}: a second {role} folder (the first is {found[role]})")
            found[role] = where
    if not found:
        return None
    if "images" in found and "emotion" not in found and (found["images"].parent / EMOTION_DIR).is_dir():
        found["emotion"] = found["images"].parent / EMOTION_DIR
    if "emotion" not in found:
        raise FerDistError(f"{found['images']}: no {EMOTION_DIR} folder beside it; give it as a second --src")
    if "images" not in found:
        raise FerDistError(f"{found['emotion']}: no {IMAGES_DIR} folder beside it; give it as a second --src")
    return found["images"], found["emotion"]


def _roles(path: Path) -> dict[str, Path]:
    """Which official folders a path is or holds (names matched case-insensitively)."""
    if not path.is_dir():
        return {}
    roles: dict[str, Path] = {}
    if path.name.lower() == EMOTION_DIR.lower():
        roles["emotion"] = path
    elif path.name.lower() == IMAGES_DIR or any(SUBJECT_DIR.match(c.name) for c in path.iterdir()):
        roles["images"] = path
    else:
        for child in sorted(path.iterdir()):
            if child.is_dir() and child.name.lower() == IMAGES_DIR:
                roles["images"] = child
            elif child.is_dir() and child.name.lower() == EMOTION_DIR.lower():
                roles["emotion"] = child
    # The label archive sometimes unpacks as Emotion_labels/Emotion/S005/...: step into the inner folder.
    inner = roles.get("emotion")
    if inner is not None and (inner / EMOTION_DIR).is_dir():
        roles["emotion"] = inner / EMOTION_DIR
    return roles


def _list_official(images: Path, emotion: Path, peak_frames: int) -> Listing:
    """First frame neutral, the last `peak_frames` the sequence's label, the frames between unlabelled."""
    walk = walk_images(images)
    prefix = images.name
    skipped = [(f"{prefix}/{rel}", reason) for rel, reason in walk.skipped]
    sequences: dict[str, list[str]] = {}
    for rel in walk.images:
        parts = rel.split("/")
        if len(parts) != 3:
            skipped.append((f"{prefix}/{rel}", "not inside a <subject>/<sequence>/ folder"))
        else:
            sequences.setdefault(f"{parts[0]}/{parts[1]}", []).append(rel)
    labels, label_files = _read_emotions(emotion)
    for seq in sorted(set(labels) - set(sequences)):
        skipped.append((f"{emotion.name}/{label_files[seq].relative_to(emotion).as_posix()}",
                        "emotion file without an image sequence"))
    records: list[Record] = []
    files = list(label_files.values())
    for seq, frames in sequences.items():
        raw = labels.get(seq)
        if raw is not None and CKPLUS_IDS[raw] is None:
            skipped.append((f"{prefix}/{seq}", "contempt sequence (not one of the 7 classes)"))
            continue
        frames.sort(key=_frame_order)
        records += _sequence_records(images, prefix, seq, frames, raw, peak_frames)
        files += [images / rel for rel in frames]
    if not records:
        raise no_images(images, "image sequences")
    return finish(records, skipped, files, DEFAULT_ALIGN)


def _sequence_records(images: Path, prefix: str, seq: str, frames: list[str], raw: int | None,
                      peak_frames: int) -> list[Record]:
    """Records of one sequence's frames, in temporal order."""
    label = None if raw is None else CKPLUS_IDS[raw]
    n = len(frames)
    records = []
    for i, rel in enumerate(frames):
        if i == 0:
            frame_label = NEUTRAL
        elif label is not None and i >= n - peak_frames:
            frame_label = label
        else:
            frame_label = None
        key = f"{prefix}/{rel}"
        meta = {"path": key, "subject": seq.split("/")[0], "sequence": seq, "frame": i, "seq_len": n}
        if label is not None:
            meta["expression"] = label  # the sequence's class, on its unlabelled frames too (intensity)
        records.append(Record(key, frame_label, meta, image_loader(images / rel)))
    return records


def _frame_order(rel: str) -> tuple[int, str]:
    """Sort frames by their trailing number (S005_001_00000011.png -> 11), then by name."""
    match = TRAILING_NUMBER.search(Path(rel).stem)
    return (int(match.group(1)) if match else -1, rel)


def _read_emotions(root: Path) -> tuple[dict[str, int], dict[str, Path]]:
    """Raw CK+ emotion id and label file per sequence ("S005/001") under the Emotion folder."""
    labels: dict[str, int] = {}
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*_emotion.txt")):
        parts = path.relative_to(root).parts
        if len(parts) != 3 or any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue
        seq = f"{parts[0]}/{parts[1]}"
        if seq in files:
            raise FerDistError(f"{path.parent}: more than one emotion file in this sequence folder")
        labels[seq] = _parse_emotion(path)
        files[seq] = path
    return labels, files


def _parse_emotion(path: Path) -> int:
    """The emotion id in a CK+ label file, written as a float ("   3.0000000e+00")."""
    text = path.read_text(errors="replace").strip()
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value.is_integer() or int(value) not in CKPLUS_IDS:
        raise FerDistError(f"{path}: not a CK+ emotion label (expected a number 0-7, found {text[:40]!r})")
    return int(value)
