"""METHOD.md section 6 augmentation and the model's resize / channel match / normalise."""

from __future__ import annotations

import math

import pytest
import torch

from fer_dist.data.augment import InputSpec, eval_transform, normalise, train_transform
from fer_dist.errors import FerDistError

GREY = InputSpec(size=40, channels=1, mean=(0.5,), std=(0.25,))
RGB = InputSpec(size=40, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("kwargs", [
    {"size": 0, "channels": 1, "mean": (0.5,), "std": (0.5,)},
    {"size": 8, "channels": 2, "mean": (0.5, 0.5), "std": (0.5, 0.5)},
    {"size": 8, "channels": 3, "mean": (0.5,), "std": (0.5,)},
    {"size": 8, "channels": 1, "mean": (0.5,), "std": (0.0,)},
])
def test_input_spec_refuses_inconsistent_values(kwargs):
    with pytest.raises(FerDistError, match="InputSpec"):
        InputSpec(**kwargs)


@pytest.mark.parametrize("kwargs", [{"shift": 0.1}, {"rotation": 15.0}, {"zoom": (1.2, 1.1)}])
def test_train_transform_refuses_settings_beyond_the_paper(kwargs):
    with pytest.raises(FerDistError, match="train_transform"):
        train_transform(GREY, **kwargs)


def test_eval_transform_resizes_and_matches_channels_and_normalise_scales():
    grey = torch.full((1, 20, 20), 102, dtype=torch.uint8)  # 0.4 in [0, 1]
    out = eval_transform(RGB)(grey)
    assert out.shape == (3, 40, 40) and out.dtype == torch.uint8 and bool((out == 102).all())
    norm = normalise(out[None], RGB)
    assert norm.shape == (1, 3, 40, 40) and norm.dtype == torch.float32
    assert torch.allclose(norm, torch.full_like(norm, (0.4 - 0.5) / 0.5), atol=1e-5)

    rgb = torch.zeros((3, 40, 40), dtype=torch.uint8)
    rgb[0] = 255  # pure red: luma 0.299
    out = eval_transform(GREY)(rgb)
    assert out.shape == (1, 40, 40)
    norm = normalise(out[None], GREY)
    assert torch.allclose(norm, torch.full_like(norm, (0.299 - 0.5) / 0.25), atol=0.02)


def test_normalise_uses_each_channels_mean_and_std():
    spec = InputSpec(size=2, channels=3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    images = torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8)
    want = (images.double() / 255 - torch.tensor(spec.mean).view(1, 3, 1, 1).double()) \
        / torch.tensor(spec.std).view(1, 3, 1, 1).double()
    assert torch.allclose(normalise(images, spec).double(), want, atol=1e-5)


def test_eval_transform_is_deterministic_and_leaves_the_generator_alone():
    image = torch.randint(0, 256, (1, 48, 48), dtype=torch.uint8)
    state = torch.get_rng_state()
    assert torch.equal(eval_transform(GREY)(image), eval_transform(GREY)(image))
    assert torch.equal(torch.get_rng_state(), state)


def test_train_transform_is_reproducible_from_the_seed():
    image = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    tf = train_transform(RGB)

    def draw(seed):
        torch.manual_seed(seed)
        return torch.stack([tf(image) for _ in range(4)])

    first = draw(7)
    assert first.shape == (4, 3, 40, 40)
    assert torch.equal(first, draw(7))
    assert not torch.equal(first, draw(8))


def _bright(out: torch.Tensor) -> torch.Tensor:
    """(row, col) coordinates of the bright pixels of a [1, H, W] output."""
    return (out[0] > 127).nonzero().float()


def test_train_geometry_stays_within_the_papers_limits():
    """Shifts under 10 % of the side, rotation within +-10 degrees, flips about half the time."""
    torch.manual_seed(0)
    tf = train_transform(InputSpec(size=40, channels=1, mean=(0.5,), std=(0.5,)))
    dot = torch.zeros((1, 40, 40), dtype=torch.uint8)
    dot[0, 19:21, 19:21] = 255  # the centre: rotation and zoom keep it in place, only the shift moves it
    shifts = [(_bright(tf(dot)).mean(0) - 19.5).abs().max().item() for _ in range(200)]
    assert max(shifts) < 0.1 * 40 + 1.0  # +1: nearest-neighbour rounding of the warped dot
    assert max(shifts) > 1.5  # it does shift

    bar = torch.zeros((1, 40, 40), dtype=torch.uint8)
    bar[0, 19:21, 8:32] = 255
    bar[0, 10:14, 8:12] = 255  # a mark on the left: tells flipped outputs apart
    angles, flipped = [], 0
    for _ in range(200):
        out = tf(bar)
        flipped += int(out[0, :, 20:].gt(127).sum() > out[0, :, :20].gt(127).sum())
        pts = _bright(out)
        line = pts[(pts[:, 0] - pts[:, 0].median()).abs() < 6]
        cov = torch.cov(line.T)
        angles.append(math.degrees(0.5 * math.atan2(2 * cov[0, 1].item(), (cov[1, 1] - cov[0, 0]).item())))
    assert max(abs(a) for a in angles) < 10.0 + 3.0  # +3: the mark and pixel rounding bias the fit
    assert max(abs(a) for a in angles) > 4.0
    assert 60 < flipped < 140


def test_warp_is_the_identity_at_zero_and_keeps_a_centre_point_within_the_shift():
    plain = InputSpec(size=48, channels=1, mean=(0.0,), std=(1.0,))
    image = torch.zeros(1, 48, 48, dtype=torch.uint8)
    image[0, 20:28, 20:28] = 255
    still = train_transform(plain, zoom=(1.0, 1.0), shift=0.0, rotation=0.0, flip=False)
    assert torch.equal(still(image), image)
    warp = train_transform(plain, flip=False)
    for seed in range(50):
        torch.manual_seed(seed)
        out = warp(image)
        assert out.shape == image.shape and out.dtype == torch.uint8
        ys, xs = torch.nonzero(out[0] > 127, as_tuple=True)
        # the square's centre (23.5) moves by the shift (<= 0.09 * 48 = 4.3 px) plus what a 10 degree turn
        # and a 10 % zoom about the image centre do to a point 0 px from it: nothing
        assert abs(ys.float().mean() - 23.5) <= 4.5 and abs(xs.float().mean() - 23.5) <= 4.5
    torch.manual_seed(3)
    a = warp(image)
    torch.manual_seed(3)
    assert torch.equal(a, warp(image))
    rgb = torch.stack([image[0], image[0] // 2, 255 - image[0]])
    torch.manual_seed(4)
    out = train_transform(InputSpec(48, 3, (0.0,) * 3, (1.0,) * 3))(rgb)
    assert out.shape == (3, 48, 48) and not torch.equal(out[0], out[2])


def test_flip_mirrors_the_face_about_its_centre():
    plain = InputSpec(size=32, channels=1, mean=(0.0,), std=(1.0,))
    image = torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8)
    flip_only = train_transform(plain, zoom=(1.0, 1.0), shift=0.0, rotation=0.0, flip=True)
    outs = []
    for seed in range(20):
        torch.manual_seed(seed)
        outs.append(flip_only(image))
    mirrored = image.flip(-1)
    assert all(torch.equal(o, image) or torch.equal(o, mirrored) for o in outs)
    assert any(torch.equal(o, mirrored) for o in outs) and any(torch.equal(o, image) for o in outs)


def test_shrinking_averages_instead_of_sampling():
    """A fine checkerboard shrunk 4x must come out mid-grey (antialiased), not as a sampled pattern."""
    board = torch.zeros(1, 64, 64, dtype=torch.uint8)
    board[0, ::2, ::2] = board[0, 1::2, 1::2] = 255
    out = eval_transform(InputSpec(size=16, channels=1, mean=(0.0,), std=(1.0,)))(board)
    assert out.shape == (1, 16, 16) and (out.float() - 127.5).abs().max() < 1.0


def test_transform_refuses_what_is_not_a_decoded_face():
    with pytest.raises(FerDistError, match="uint8 face"):
        eval_transform(GREY)(torch.zeros(2, 8, 8, dtype=torch.uint8))
    with pytest.raises(FerDistError, match="uint8 face"):
        eval_transform(GREY)(torch.zeros(1, 8, 8))
