"""Tiny data sets written in each source's exact published layout, for tests (`from layouts import ...`).

Every image's pixels come from `pixels(seed, shape)`, so a test can compare what a loader returns.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

SHAPE = (12, 16)  # tiny images keep the fixtures fast

# FER2013 CSV rows: (emotion id, Usage).
FER_ROWS: tuple[tuple[int, str], ...] = (
    (0, "Training"), (3, "Training"), (6, "PublicTest"), (4, "PrivateTest"), (1, "PrivateTest"),
)
# FER2013 image-folder form, as in ../shared/data/fer2013.
FER_FILES: tuple[str, ...] = (
    "train/angry/Training_10118481.jpg", "train/happy/Training_2.jpg", "test/neutral/PublicTest_3.jpg",
    "test/sad/PrivateTest_4.jpg", "test/surprise/PrivateTest_5.jpg",
)
# CK+ sequences: "subject/sequence" -> (number of frames, emotion id of its Emotion file or None for no file).
CK_SEQUENCES: dict[str, tuple[int, int | None]] = {
    "S005/001": (5, 5),  # happy
    "S005/002": (4, None),  # no emotion file
    "S010/001": (4, 2),  # contempt
    "S010/002": (3, 7),  # surprise
}
# CK+48: class folder -> file names.
CK48_FILES: dict[str, tuple[str, ...]] = {
    "anger": ("S010_004_00000017.png", "S010_004_00000018.png"),
    "contempt": ("S138_008_00000007.png",),
    "happy": ("S011_006_00000012.png",),
    "surprise": ("S022_001_00000030.png",),
}
RAFD_ANGLES: tuple[int, ...] = (45, 90, 135)
JAFFE_FILES: tuple[str, ...] = ("KA.AN1.39.tiff", "KA.HA2.44.tiff", "KM.NE1.1.tiff", "YM.SU3.60.tiff")


def pixels(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Deterministic random uint8 pixels."""
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def write_image(path: Path, image: np.ndarray) -> Path:
    """Write an image with OpenCV (grey, or BGR for 3 channels), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image), path
    return path


def make_fer2013_csv(path: Path, rows: tuple[tuple[int, str], ...] = FER_ROWS,
                     header: str = "emotion,pixels,Usage") -> Path:
    """The Kaggle fer2013.csv, 48x48 pixels as space-separated ints; row i holds pixels(i, (48, 48))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [header]
    for i, (emotion, usage) in enumerate(rows):
        lines.append(f"{emotion},{' '.join(map(str, pixels(i, (48, 48)).ravel()))},{usage}")
    path.write_text("\n".join(lines) + "\n")
    return path


def make_fer2013_folders(root: Path, files: tuple[str, ...] = FER_FILES) -> Path:
    """`train|test/<class>/<Usage>_<id>.jpg`, 48x48 grey JPEGs, and a README at the root."""
    for i, rel in enumerate(files):
        write_image(root / rel, pixels(i, (48, 48)))
    (root / "README.md").write_text("FER2013\n")
    return root


def make_ckplus(root: Path, sequences: dict[str, tuple[int, int | None]] | None = None) -> Path:
    """The official CK+ layout: cohn-kanade-images/S005/001/S005_001_00000001.png and
    Emotion/S005/001/S005_001_0000000N_emotion.txt (N = last frame), plus a .DS_Store as the archive has.

    Frame f (1-based) of sequence number s (in the order given) has pixels(100 * s + f).
    """
    for s, (seq, (frames, emotion)) in enumerate((sequences or CK_SEQUENCES).items()):
        subject, number = seq.split("/")
        folder = root / "cohn-kanade-images" / subject / number
        for f in range(1, frames + 1):
            write_image(folder / f"{subject}_{number}_{f:08d}.png", pixels(100 * s + f))
        if emotion is not None:
            label = root / "Emotion" / subject / number / f"{subject}_{number}_{frames:08d}_emotion.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(f"   {emotion:.7e}\n")
    (root / "Emotion").mkdir(parents=True, exist_ok=True)
    first = next(iter(sequences or CK_SEQUENCES))
    (root / "cohn-kanade-images" / first / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root


def make_ck48(root: Path, files: dict[str, tuple[str, ...]] | None = None) -> Path:
    """CK+48: `<class>/S010_004_00000017.png`, 48x48 grey PNGs."""
    for i, (folder, names) in enumerate((files or CK48_FILES).items()):
        for j, name in enumerate(names):
            write_image(root / folder / name, pixels(10 * i + j, (48, 48)))
    return root


def rafd_name(angle: int, subject: str, expression: str, gaze: str = "frontal") -> str:
    """A RaFD file name such as Rafd090_01_Caucasian_female_angry_frontal.jpg."""
    return f"Rafd{angle:03d}_{subject}_Caucasian_female_{expression}_{gaze}.jpg"


def make_rafd(root: Path, subjects: tuple[str, ...] = ("01", "02"), angles: tuple[int, ...] = RAFD_ANGLES,
              expressions: tuple[str, ...] = ("angry", "happy", "contemptuous"),
              gazes: tuple[str, ...] = ("frontal", "left")) -> Path:
    """RaFD's flat folder of colour JPEGs, plus a stray image and a Thumbs.db."""
    folder = root / "RafDDownload-1"
    i = 0
    for angle in angles:
        for subject in subjects:
            for expression in expressions:
                for gaze in gazes:
                    write_image(folder / rafd_name(angle, subject, expression, gaze), pixels(i, (*SHAPE, 3)))
                    i += 1
    write_image(folder / "thumbnail.jpg", pixels(999, (*SHAPE, 3)))
    (folder / "Thumbs.db").write_bytes(b"\x00" * 8)
    return root


def make_jaffe(root: Path, files: tuple[str, ...] = JAFFE_FILES) -> Path:
    """JAFFE: palette ("P") TIFFs named KA.AN1.39.tiff with a grey palette, plus README and .DS_Store."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(files):
        Image.fromarray(pixels(i), "L").convert("P").save(root / name)
    (root / "README").write_text("The Japanese Female Facial Expression (JAFFE) Database\n")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root


def make_imagefolder(root: Path) -> Path:
    """`<root>/<class>/*` with alias folder names (joy, calm), a contempt folder and a stray text file."""
    write_image(root / "joy" / "a.png", pixels(1))
    write_image(root / "joy" / "b.PNG", pixels(2))
    write_image(root / "calm" / "S011_002_00000003.png", pixels(3))
    write_image(root / "contempt" / "c.png", pixels(4))
    (root / "notes.txt").write_text("hand-made set\n")
    return root


def make_unlabelled(root: Path) -> Path:
    """Any tree of images, with a text file and macOS zip debris."""
    write_image(root / "a" / "b" / "c.png", pixels(1))
    write_image(root / "x.jpg", pixels(2, (*SHAPE, 3)))
    (root / "y.txt").write_text("not an image\n")
    (root / "__MACOSX" / "._x.jpg").parent.mkdir(parents=True)
    (root / "__MACOSX" / "._x.jpg").write_bytes(b"\x00\x05\x16\x07")
    return root
