"""What every source shares: Record, Listing, SourceOptions, the tree walk and the image readers."""

from __future__ import annotations

import io
import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from fer_dist.errors import FerDistError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp"}
)
FER2013_SIDE = 48
# Bytes per read: a small first one (most face images fit, and a run of read-ahead files stays small in
# memory: 64 KB first reads made FER2013 0.8-9 us a face slower), then larger ones for the rest of a file.
_FIRST_READ, _READ_SIZE = 1 << 14, 1 << 16
_UINT8 = np.dtype(np.uint8)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0)  # O_BINARY: Windows only


class ImageReadError(FerDistError):
    """An image file (or CSV pixel row) that cannot be decoded; names the file and what is wrong."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self) -> tuple:
        # Pool workers send exceptions back pickled; the default reduce would call __init__ with one argument.
        return (type(self), (self.path, self.reason))


class Record(NamedTuple):
    """One face of a source: a stable key, its label (None = unlabelled), metadata and a picklable loader.

    A named tuple, not a dataclass: sources make one per image, and this is half the cost.
    """

    key: str
    label: int | None
    meta: dict
    load: Callable[[], np.ndarray]


@dataclass
class Listing:
    """What a source found: records sorted by key, files left out with a reason, every input file."""

    records: list[Record]
    skipped: list[tuple[str, str]]
    files: list[Path | str]  # every input file, for the source fingerprint (str: cheaper for many files)
    default_align: str


@dataclass(frozen=True)
class SourceOptions:
    """Every source option with its default; each source reads the ones it knows."""

    peak_frames: int = 1  # ckplus: the last N frames of a sequence carry its label
    angles: tuple[int, ...] = (90,)  # rafd: camera angles kept
    class_map: str | None = None  # imagefolder: e.g. "joy=happy,contempt=skip"
    subjects: int = 60  # synthetic
    frames: int = 10  # synthetic
    image_size: int = 48  # synthetic
    seed: int = 0  # synthetic


@dataclass
class Walk:
    """Image files under a root (relative POSIX paths, sorted) and the files left out on the way."""

    images: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def is_image(name: str) -> bool:
    """Whether a file name has one of the recognised image extensions (case-insensitive)."""
    dot = name.rfind(".")
    if dot > 0 and name[0] != ".":  # os.path.splitext's answer, without its cost (this runs once per file)
        return name[dot:].lower() in IMAGE_EXTENSIONS
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def one_src(src: list[Path], source: str) -> Path:
    """The single existing path a one-root source takes."""
    if len(src) != 1:
        raise FerDistError(f"--src: the {source} source takes one path, got {len(src)}")
    return existing(src[0])


def existing(path: Path) -> Path:
    """The path itself, or a one-line FerDistError when it does not exist."""
    path = Path(path)
    if not path.exists():
        raise FerDistError(f"{path}: no such file or folder")
    return path


def walk_images(root: Path) -> Walk:
    """Every image file under root, sorted; hidden files, macOS debris and non-images go to `skipped`."""
    if not root.is_dir():
        raise FerDistError(f"{root}: not a folder")
    walk = Walk()
    top = os.fspath(root)
    cut = len(os.path.join(top, ""))  # os.walk names sub-folders os.path.join(top, ...)
    # Strings, not Paths: this runs once per file, and a pathlib join costs several microseconds.
    for here, dirs, files in os.walk(top):
        prefix = here[cut:].replace(os.sep, "/") + "/" if len(here) > len(top) else ""
        kept = []
        for name in sorted(dirs):
            # Zip archives made on macOS carry __MACOSX/ trees of "._x.png" files that are not images.
            if name.startswith(".") or name == "__MACOSX":
                walk.skipped.append((prefix + name, "hidden or system folder"))
            else:
                kept.append(name)
        dirs[:] = kept
        for name in files:
            if name.startswith("."):
                walk.skipped.append((prefix + name, "hidden file"))
            elif not is_image(name):
                walk.skipped.append((prefix + name, "not an image"))
            else:
                walk.images.append(prefix + name)
    walk.images.sort()
    walk.skipped.sort()
    return walk


def path_prefix(root: Path) -> str:
    """The text that turns a relative POSIX path `rel` from walk_images into str(root / rel)."""
    top = os.fspath(root)
    return "" if top == "." else os.path.join(top, "")


def no_images(root: Path, what: str = "images") -> FerDistError:
    """The error for a root that yields nothing."""
    return FerDistError(f"{root}: no {what} found")


def finish(records: list[Record], skipped: list[tuple[str, str]], files: Sequence[Path | str],
           align: str) -> Listing:
    """A Listing with records sorted by key (keys checked unique) and skipped entries sorted."""
    records = sorted(records, key=operator.attrgetter("key"))
    keys = [r.key for r in records]
    if len(set(keys)) != len(keys):
        duplicate = next(a for a, b in zip(keys, keys[1:], strict=False) if a == b)
        raise FerDistError(f"{duplicate}: two records share this key")
    return Listing(records, sorted(skipped), sorted(files), align)


class ImageFile(NamedTuple):
    """A picklable loader of one image file: calling it gives read_image(path). The shard job reads the
    file itself instead (read_file, decode_image) to learn its size on the way."""

    path: str

    def __call__(self) -> np.ndarray:
        return read_image(self.path)


def image_loader(path: Path | str) -> ImageFile:
    """A picklable loader of one image file."""
    return ImageFile(os.fspath(path))


def read_image(path: str) -> np.ndarray:
    """Read an image file as uint8 grey (HxW) or RGB (HxWx3); raises ImageReadError naming the file."""
    return decode_image(read_file(path), path)


def read_file(path: str) -> bytes:
    """A whole file's bytes by plain system calls (~5 us a face; np.fromfile ~20, open().read() ~9)."""
    try:
        fd = os.open(path, _READ_FLAGS)
        try:
            chunks, size = [], _FIRST_READ
            while chunk := os.read(fd, size):  # the last read finds the end
                chunks.append(chunk)
                size = _READ_SIZE
        finally:
            os.close(fd)
    except OSError as exc:
        raise ImageReadError(path, f"cannot read ({exc.strerror or exc})") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def decode_image(data: bytes, path: str) -> np.ndarray:
    """An image file's bytes as uint8 grey (HxW) or RGB (HxWx3); raises ImageReadError naming the file."""
    if not data:
        raise ImageReadError(path, "empty file")
    try:
        image = cv2.imdecode(np.frombuffer(data, _UINT8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        image = None
    if image is not None and image.ndim == 2 and image.dtype == _UINT8 and image.size:
        return image  # 8-bit grey, the common case: nothing below would change it (imdecode's are contiguous)
    if image is None:
        image = _read_with_pil(data, path)
    elif image.ndim == 3:
        # OpenCV gives BGR(A); palettes come out as BGR too.
        code = cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
        image = cv2.cvtColor(image, code) if image.shape[2] in (3, 4) else image[..., 0]
    image = _to_uint8(image, path)
    if image.size == 0:
        raise ImageReadError(path, "image has no pixels")
    return _grey_if_colourless(image)


def _read_with_pil(data: bytes, path: str) -> np.ndarray:
    """PIL's reading of what OpenCV could not decode (some TIFF variants); RGB or single channel."""
    from PIL import Image, UnidentifiedImageError  # rarely needed: pool workers start without it

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "HSV", "LAB"):
                im = im.convert("RGB")
            elif im.mode == "1":
                im = im.convert("L")
            return np.asarray(im)
    except UnidentifiedImageError:
        # PIL's own message names the BytesIO it was given, not the file
        raise ImageReadError(path, "not a readable image (unknown or damaged format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, f"not a readable image ({exc})") from None


def _to_uint8(image: np.ndarray, path: str) -> np.ndarray:
    """Bring 16-bit, 32-bit and float images to uint8 range."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.floating):
        peak = float(np.nanmax(image)) if image.size else 0.0
        scale = 255.0 if peak <= 1.0 else 1.0  # floats in [0, 1] are the usual convention
        return np.clip(np.nan_to_num(image) * scale, 0, 255).round().astype(np.uint8)
    if np.issubdtype(image.dtype, np.integer):
        return np.clip(image, 0, 255).astype(np.uint8)
    raise ImageReadError(path, f"unsupported pixel type {image.dtype}")


def _grey_if_colourless(image: np.ndarray) -> np.ndarray:
    """Grey for a 3-channel image whose channels are equal (palette TIFFs, grey photos saved as RGB)."""
    if image.ndim == 3:
        if image.shape[2] == 1:
            return np.ascontiguousarray(image[..., 0])
        if np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]):
            return np.ascontiguousarray(image[..., 0])
    return np.ascontiguousarray(image)


def decode_pixels(pixels: str, where: str, side: int = FER2013_SIDE) -> np.ndarray:
    """Decode a FER2013 pixel string (side*side space-separated ints 0..255) to a uint8 grey image."""
    try:
        values = np.array(pixels.split(), dtype=np.int64)
    except ValueError:
        raise ImageReadError(where, "pixels are not all integers") from None
    if values.size != side * side:
        raise ImageReadError(where, f"{values.size} pixel values, expected {side * side} ({side}x{side})")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ImageReadError(where, "pixel values outside 0..255")
    return values.astype(np.uint8).reshape(side, side)
