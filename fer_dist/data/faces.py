"""Face alignment: Haar face and eye detection, eyes levelled at a fixed distance, centre-crop fallback.

Runs inside pool workers: the cascades load lazily, once per process, and nothing here holds other state.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np

from fer_dist.errors import FerDistError

METHODS: tuple[str, ...] = ("none", "haar")
# Target geometry of an aligned crop, as fractions of its side: the eyes 0.40 apart, centred, on a line 0.38
# from the top. These are roughly where the eyes sit in OpenCV's frontal-face box, so an aligned crop and the
# face-box fallback (no eyes found) frame the face alike.
EYE_DISTANCE = 0.40
EYE_LINE = 0.38
# Where the eyes sit in a frontal-face box when the eye cascade finds none (fractions of the box): the medians
# of the eyes found in 260 FER2013 test faces, made symmetric.
BOX_EYES: tuple[tuple[float, float], tuple[float, float]] = ((0.285, 0.375), (0.715, 0.375))
DETECT_MAX_SIDE = 400  # detect on a copy no larger than this: Haar cost grows with the pixel count
DETECT_MIN_SIDE = 192  # and no smaller: on 48 px faces the eye cascade finds eyes 4x more often at 192 px
MIN_FACE_FRACTION = 0.3  # of the shorter side: faces fill 40 % or more of these sets; smaller hits are false
EYE_BAND = 0.55  # eyes are searched in the top 55 % of the face box
_CASCADE_FILES = {"face": "haarcascade_frontalface_default.xml", "eye": "haarcascade_eye.xml"}
_CASCADES: dict[str, cv2.CascadeClassifier] = {}
_UINT8 = np.dtype(np.uint8)

Box = tuple[int, int, int, int]  # x, y, width, height
Point = tuple[float, float]


class AlignedFace(NamedTuple):
    """An aligned face crop; detected is True (face and eyes), False (fallback) or None (not attempted)."""

    image: np.ndarray
    detected: bool | None


def align_face(image: np.ndarray, size: int, method: str) -> AlignedFace:
    """Crop `image` (uint8 grey HxW or RGB HxWx3) to size x size; same number of channels out."""
    if method not in METHODS:
        raise FerDistError(f"--align: unknown method {method!r} (known: {', '.join(METHODS)})")
    if image.dtype != _UINT8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"expected a uint8 HxW or HxWx3 image, got {image.dtype} {image.shape}")
    if size < 1:
        raise FerDistError(f"--size: must be at least 1, got {size}")
    if method == "none":
        return AlignedFace(centre_crop(image, size), None)
    return align_found(image, find_face(to_grey(image)), size)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """A grey (HxW) or RGB (HxWx3) image with `channels` channels, converted only where needed."""
    if channels == 1 and image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if channels == 3 and image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return image


def to_grey(image: np.ndarray) -> np.ndarray:
    """The grey image detection works on (the image itself when it is grey)."""
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def align_found(image: np.ndarray, found: tuple[Box, tuple[Point, Point] | None] | None,
                size: int) -> AlignedFace:
    """`align_face`'s crop from `find_face`'s result: eye-levelled, box-framed or, with no face, centred."""
    if found is None:
        return AlignedFace(centre_crop(image, size), False)
    box, eyes = found
    detected = eyes is not None
    if eyes is None:
        # A face without two plausible eyes: frame its box as an aligned crop would (counted as a fallback).
        x, y, w, h = box
        (lx, ly), (rx, ry) = BOX_EYES
        eyes = ((x + lx * w, y + ly * h), (x + rx * w, y + ry * h))
    return AlignedFace(warp_to_eyes(image, eyes[0], eyes[1], size), detected)


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The centre square of the image resized to size x size (area interpolation when shrinking); the image
    itself, not a copy, when it already is size x size (FER2013 and other pre-cropped sets)."""
    h, w = image.shape[:2]
    if h == w == size:
        return image
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top:top + side, left:left + side]
    interpolation = cv2.INTER_AREA if side >= size else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(square, (size, size), interpolation=interpolation))


def eye_alignment_matrix(left_eye: Point, right_eye: Point, size: int) -> np.ndarray:
    """2x3 affine (rotation + uniform scale + shift) putting the eyes level at the target crop positions.

    `left_eye` is the eye on the image's left. Target: (size * (0.5 -+ EYE_DISTANCE / 2), size * EYE_LINE).
    """
    (lx, ly), (rx, ry) = left_eye, right_eye
    dx, dy = rx - lx, ry - ly
    distance = math.hypot(dx, dy)
    if distance < 1e-6:
        raise ValueError("the two eyes are at the same point")
    scale = EYE_DISTANCE * size / distance
    cos, sin = dx / distance, dy / distance
    # Rotating by minus the eye line's angle maps (dx, dy) onto (distance, 0): the eyes come out level.
    linear = scale * np.array([[cos, sin], [-sin, cos]])
    centre = np.array([(lx + rx) / 2, (ly + ry) / 2])
    target = np.array([size / 2, EYE_LINE * size])
    return np.hstack([linear, (target - linear @ centre)[:, None]])


def warp_to_eyes(image: np.ndarray, left_eye: Point, right_eye: Point, size: int) -> np.ndarray:
    """Warp the image so the eyes land at the target positions in a size x size crop (borders replicated)."""
    matrix = eye_alignment_matrix(left_eye, right_eye, size)
    scale = math.hypot(matrix[0, 0], matrix[0, 1])
    if scale < 0.8:
        # warpAffine has no area filter: shrink with INTER_AREA first so large photos do not alias.
        h, w = image.shape[:2]
        factor = scale
        image = cv2.resize(image, (max(1, round(w * factor)), max(1, round(h * factor))),
                           interpolation=cv2.INTER_AREA)
        fx, fy = image.shape[1] / w, image.shape[0] / h
        left_eye = (left_eye[0] * fx, left_eye[1] * fy)
        right_eye = (right_eye[0] * fx, right_eye[1] * fy)
        matrix = eye_alignment_matrix(left_eye, right_eye, size)
    out = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(out)


def find_face(grey: np.ndarray) -> tuple[Box, tuple[Point, Point] | None] | None:
    """The largest face box and its (left, right) eye centres in full-image coordinates; None: no face."""
    h, w = grey.shape
    factor = min(DETECT_MAX_SIDE / max(h, w), max(1.0, DETECT_MIN_SIDE / max(h, w)))
    small = grey
    if factor != 1.0:
        interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
        small = cv2.resize(grey, (max(1, round(w * factor)), max(1, round(h * factor))),
                           interpolation=interpolation)
    small = cv2.equalizeHist(small)
    min_face = max(24, int(MIN_FACE_FRACTION * min(small.shape)))
    faces = _cascade("face").detectMultiScale(small, scaleFactor=1.1, minNeighbors=5,
                                              minSize=(min_face, min_face))
    if len(faces) == 0:
        return None
    x, y, fw, fh = (int(v) for v in max(faces, key=lambda f: int(f[2]) * int(f[3])))
    band = small[y:y + int(EYE_BAND * fh), x:x + fw]
    min_eye = max(5, fw // 10)
    found = _cascade("eye").detectMultiScale(band, scaleFactor=1.1, minNeighbors=4,
                                             minSize=(min_eye, min_eye), maxSize=(fw // 2, fw // 2))
    eyes = pick_eyes([tuple(int(v) for v in e) for e in found], (x, y, fw, fh))
    box = tuple(round(v / factor) for v in (x, y, fw, fh))
    if eyes is None:
        return box, None
    return box, ((eyes[0][0] / factor, eyes[0][1] / factor), (eyes[1][0] / factor, eyes[1][1] / factor))


def pick_eyes(candidates: list[Box], face: Box) -> tuple[Point, Point] | None:
    """The most plausible (left, right) eye centres among eye boxes found in the face's top band.

    Candidate boxes are relative to the face box's top-left corner; the points returned are in the image's
    coordinates. Each half of the face takes the candidate nearest where an eye is expected; the pair is
    refused when the eyes are implausibly close, far apart or tilted.
    """
    x, y, w, h = face
    centres = [(cx + cw / 2, cy + ch / 2) for cx, cy, cw, ch in candidates]
    halves = ([c for c in centres if c[0] < w / 2], [c for c in centres if c[0] >= w / 2])
    left, right = (
        min(half, key=lambda c, e=(ex * w, ey * h): math.dist(c, e), default=None)
        for half, (ex, ey) in zip(halves, BOX_EYES, strict=True)
    )
    if left is None or right is None:
        return None
    dx, dy = right[0] - left[0], right[1] - left[1]
    # Found eyes lie 0.43 +- 0.06 of the box apart; wider or narrower pairs, or a tilt over ~27 degrees, are
    # more likely an eyebrow, a nostril or a false face.
    if not 0.3 * w <= dx <= 0.6 * w or abs(dy) > 0.5 * dx:
        return None
    return (x + left[0], y + left[1]), (x + right[0], y + right[1])


def _cascade(name: str) -> cv2.CascadeClassifier:
    """One of OpenCV's bundled Haar cascades, loaded once per process."""
    if name not in _CASCADES:
        path = cv2.data.haarcascades + _CASCADE_FILES[name]
        cascade = cv2.CascadeClassifier(path)
        if cascade.empty():
            raise FerDistError(f"{path}: cannot load OpenCV's Haar cascade")
        _CASCADES[name] = cascade
    return _CASCADES[name]
