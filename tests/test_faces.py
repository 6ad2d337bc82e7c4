"""Face alignment: the eye geometry on points, the warp on drawn eyes, fallbacks, sizes and channels."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from fer_dist.data import faces
from fer_dist.data.faces import (
    EYE_DISTANCE,
    EYE_LINE,
    align_face,
    centre_crop,
    eye_alignment_matrix,
    pick_eyes,
    warp_to_eyes,
)
from fer_dist.errors import FerDistError

SHARED_FER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fer2013"


def apply(matrix: np.ndarray, point: tuple[float, float]) -> np.ndarray:
    return matrix @ np.array([point[0], point[1], 1.0])


@pytest.mark.parametrize("seed", range(20))
def test_eye_alignment_matrix_puts_eyes_on_target(seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = int(rng.integers(24, 300))
    angle = rng.uniform(-np.pi / 3, np.pi / 3)
    distance = rng.uniform(5, 400)
    middle = rng.uniform(0, 1000, size=2)
    offset = distance / 2 * np.array([math.cos(angle), math.sin(angle)])
    left, right = tuple(middle - offset), tuple(middle + offset)
    matrix = eye_alignment_matrix(left, right, size)
    assert matrix.shape == (2, 3)
    half = EYE_DISTANCE * size / 2
    np.testing.assert_allclose(apply(matrix, left), [size / 2 - half, EYE_LINE * size], atol=1e-9)
    np.testing.assert_allclose(apply(matrix, right), [size / 2 + half, EYE_LINE * size], atol=1e-9)
    # A similarity: no shear, the same scale on both axes.
    linear = matrix[:, :2]
    np.testing.assert_allclose(linear @ linear.T, np.eye(2) * np.linalg.det(linear), atol=1e-9)


def test_eye_alignment_matrix_refuses_one_point() -> None:
    with pytest.raises(ValueError):
        eye_alignment_matrix((10.0, 10.0), (10.0, 10.0), 48)


def blob_centres(image: np.ndarray) -> list[tuple[float, float]]:
    """Centroids of the bright blobs, left to right."""
    count, _, _, centroids = cv2.connectedComponentsWithStats((image > 127).astype(np.uint8))
    return sorted((float(x), float(y)) for x, y in centroids[1:count])


@pytest.mark.parametrize(("shape", "distance", "degrees"), [((900, 700), 260, 17), ((120, 100), 30, -12)])
def test_warp_to_eyes_levels_drawn_eyes(shape: tuple[int, int], distance: float, degrees: float) -> None:
    # Large photos go through the INTER_AREA pre-shrink, small ones are enlarged: both must land the eyes.
    image = np.zeros(shape, np.uint8)
    centre = np.array([shape[1] * 0.45, shape[0] * 0.4])
    offset = distance / 2 * np.array([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])
    radius = max(2, round(distance * 0.06))
    left, right = centre - offset, centre + offset
    for eye in (left, right):
        cv2.circle(image, (round(eye[0]), round(eye[1])), radius, 255, -1, lineType=cv2.LINE_AA)
    size = 96
    out = warp_to_eyes(image, tuple(left), tuple(right), size)
    assert out.shape == (size, size) and out.dtype == np.uint8
    found = blob_centres(out)
    assert len(found) == 2
    half, line = EYE_DISTANCE * size / 2, EYE_LINE * size
    np.testing.assert_allclose(found, [(size / 2 - half, line), (size / 2 + half, line)], atol=1.0)


def test_blank_image_falls_back_to_centre_crop() -> None:
    image = np.full((90, 150), 128, np.uint8)
    image[:, 30:120] = 200  # the centre 90x90 square
    result = align_face(image, 48, "haar")
    assert result.detected is False
    assert result.image.shape == (48, 48) and (result.image == 200).all()


@pytest.mark.parametrize("method", ["none", "haar"])
@pytest.mark.parametrize("channels", [None, 3])
@pytest.mark.parametrize("size", [32, 112])
def test_size_and_channels(method: str, channels: int | None, size: int) -> None:
    shape = (64, 80) if channels is None else (64, 80, channels)
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    result = align_face(image, size, method)
    assert result.image.shape == ((size, size) if channels is None else (size, size, 3))
    assert result.image.dtype == np.uint8 and result.image.flags.c_contiguous
    # "none" is not attempted (None), unlike a fallback (False); random noise holds no face with two eyes.
    assert result.detected is (None if method == "none" else False)


def test_centre_crop_keeps_the_middle() -> None:
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = (10, 200, 30)
    out = centre_crop(image, 20)
    assert out.shape == (20, 20, 3) and (out == (10, 200, 30)).all()
    tall = np.zeros((80, 40), np.uint8)
    tall[20:60] = 99
    assert (centre_crop(tall, 100) == 99).all()


def test_bad_arguments() -> None:
    with pytest.raises(FerDistError, match="--align: unknown method 'dlib'"):
        align_face(np.zeros((10, 10), np.uint8), 48, "dlib")
    with pytest.raises(ValueError, match="uint8"):
        align_face(np.zeros((10, 10), np.float32), 48, "none")
    with pytest.raises(ValueError, match="HxWx3"):
        align_face(np.zeros((10, 10, 4), np.uint8), 48, "none")


FACE = (100, 50, 200, 200)  # x, y, w, h


def test_pick_eyes_takes_the_plausible_pair() -> None:
    left, right, brow, nostril = (45, 60, 30, 30), (125, 62, 30, 30), (40, 20, 40, 20), (90, 100, 20, 10)
    picked = pick_eyes([brow, right, nostril, left], FACE)
    assert picked == ((100 + 60, 50 + 75), (100 + 140, 50 + 77))


@pytest.mark.parametrize(
    "candidates",
    [[(45, 60, 30, 30)],  # one eye only
     [(45, 60, 30, 30), (125, 130, 30, 30)],  # tilted by far more than a head does
     [(75, 60, 20, 20), (105, 60, 20, 20)],  # too close together for this face box
     []],
)
def test_pick_eyes_refuses_implausible(candidates: list) -> None:
    assert pick_eyes(candidates, FACE) is None


def test_cascades_load_once() -> None:
    first = faces._cascade("face")
    assert faces._cascade("face") is first and not first.empty()
    assert not faces._cascade("eye").empty()


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_FER.is_dir(), reason="../shared/data/fer2013 is absent")
def test_haar_finds_real_faces() -> None:
    from fer_dist.data.sources.base import read_image

    files = sorted((SHARED_FER / "test" / "happy").glob("*.jpg"))[:60]
    results = [align_face(read_image(str(f)), 48, "haar") for f in files]
    detected = sum(r.detected is True for r in results)
    # Measured: about a third of FER2013's 48 px faces yield a face and both eyes with these cascades.
    assert detected >= len(files) // 5
    assert all(r.image.shape == (48, 48) for r in results)
