"""METHOD.md section 6 augmentation and the model's resize, in one OpenCV pass per face; normalisation.

A transform takes one decoded face, a uint8 tensor [C, H, W] with C = 1 (grey) or 3 (RGB, in that order),
and returns a uint8 tensor [spec.channels, spec.size, spec.size]. Normalising to the model's mean and std is
left to `normalise`, which FerNet applies to uint8 batches on the model's device: a loader worker then ships
a quarter of the bytes (uint8, not float32) and spends no time on float arithmetic the accelerator does
for free.

Stage order (train): horizontal flip and one affine warp (rotation within +-10 degrees, shifts strictly
under 10 % of the side in x and y, slight zoom in 1.0 - 1.1), folded into a single warpAffine at the face's
own size -> resize to the model's side -> channel match. The geometry comes before the resize so a small face
is warped at its own size (cheaper, and the resize then smooths the warp); the channel match comes after it
so a grey face is resized once, not three times.

Why not torchvision.transforms.v2: its per-call dispatch made the same pipeline cost 130 us per 48 px face
(60 us without augmentation) against ~15 us here, and the loader's CPU is taken from training.

The random draws come from torch's global generator (five uniforms per face: flip, angle, x and y shift,
zoom). The transform does not seed it: the stream does, before each face, from (seed, epoch, id), so a face
is augmented alike on any number of processes and workers and after a resume (fer_dist/data/plan.py,
`sample_seeds`). Transforms are plain picklable objects so DataLoader workers can use them under
forkserver or spawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from fer_dist.data.plan import sample_seeds
from fer_dist.errors import FerDistError

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: square side in pixels, channels, per-channel mean and std of [0, 1] pixels."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.size < 1:
            raise FerDistError(f"InputSpec.size: {self.size} is not a positive side in pixels")
        if self.channels not in (1, 3):
            raise FerDistError(f"InputSpec.channels: {self.channels} is neither 1 (grey) nor 3 (RGB)")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise FerDistError(f"InputSpec: mean {self.mean} and std {self.std} need {self.channels} values")
        if min(self.std) <= 0:
            raise FerDistError(f"InputSpec.std: {self.std} has a value that is not positive")


@dataclass(frozen=True)
class Augmentation:
    """METHOD.md section 6's ranges: rotation in degrees, shift as a share of the side, zoom (low, high)."""

    rotation: float
    shift: float
    zoom: tuple[float, float]
    flip: bool

    def matrix(self, h: int, w: int) -> np.ndarray:
        """A 2x3 affine matrix drawn from torch's generator: flip, then rotation and zoom about the
        centre, then the shift (v2.RandomAffine's order)."""
        flip, turn, dx, dy, zoom = torch.rand(5).tolist()
        angle = math.radians((2 * turn - 1) * self.rotation)
        scale = self.zoom[0] + zoom * (self.zoom[1] - self.zoom[0])
        # cv2.getRotationMatrix2D's matrix about the centre, written out: NumPy's small-array calls
        # cost more than the warp itself on a 48 px face
        a, b = scale * math.cos(angle), scale * math.sin(angle)
        cx, cy = (w - 1) * 0.5, (h - 1) * 0.5
        tx = (1 - a) * cx - b * cy + round((2 * dx - 1) * self.shift * w)
        ty = b * cx + (1 - a) * cy + round((2 * dy - 1) * self.shift * h)
        if self.flip and flip < 0.5:  # x -> w - 1 - x before the rest
            return np.array([[-a, b, tx + a * (w - 1)], [b, a, ty - b * (w - 1)]])
        return np.array([[a, b, tx], [-b, a, ty]])


class FaceTransform:
    """uint8 face [C, H, W] -> uint8 [channels, size, size] of the spec: augment, resize, match channels."""

    def __init__(self, spec: InputSpec, augmentation: Augmentation | None) -> None:
        self.spec, self.augmentation = spec, augmentation

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 3 or image.dtype != torch.uint8 or image.shape[0] not in (1, 3):
            raise FerDistError(f"transform: need a uint8 face [1 or 3, H, W], got {image.dtype} "
                               f"{tuple(image.shape)}")
        # HxW (grey) or HxWx3 (RGB): OpenCV's layout; a grey face is a view, not a copy
        pixels = image.numpy()
        pixels = pixels[0] if image.shape[0] == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0))
        h, w = pixels.shape[:2]
        if self.augmentation is not None:
            pixels = cv2.warpAffine(pixels, self.augmentation.matrix(h, w), (w, h), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        side = self.spec.size
        if (h, w) != (side, side):
            # INTER_AREA averages when shrinking (antialiased); bilinear when enlarging
            method = cv2.INTER_AREA if side * side < h * w else cv2.INTER_LINEAR
            pixels = cv2.resize(pixels, (side, side), interpolation=method)
        if pixels.ndim == 2:
            out = torch.from_numpy(pixels)[None]
            return out.expand(3, side, side).contiguous() if self.spec.channels == 3 else out
        if self.spec.channels == 1:
            return torch.from_numpy(cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY))[None]
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return f"FaceTransform({self.spec}, {self.augmentation})"


def normalise(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 faces [N, C, H, W] -> float32 (x / 255 - mean) / std, on the images' device."""
    std = torch.tensor(spec.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return images.float().mul_(1.0 / 255).sub_(mean).div_(std)


def train_transform(
    spec: InputSpec,
    *,
    zoom: tuple[float, float] = (1.0, 1.1),
    shift: float = 0.09,
    rotation: float = 10.0,
    flip: bool = True,
) -> Transform:
    """METHOD.md section 6: slight zoom, horizontal flip, shifts under 10 %, rotation within +-10 degrees."""
    if not 0.0 <= shift < 0.1:
        raise FerDistError(f"train_transform shift: {shift} is not under 10 % of the side (0 <= shift < 0.1)")
    if not 0.0 <= rotation <= 10.0:
        raise FerDistError(f"train_transform rotation: {rotation} is outside 0 - 10 degrees")
    if not 0.0 < zoom[0] <= zoom[1]:
        raise FerDistError(f"train_transform zoom: {zoom} is not a range (low, high) of positive scales")
    return FaceTransform(spec, Augmentation(rotation, shift, (float(zoom[0]), float(zoom[1])), flip))


def eval_transform(spec: InputSpec) -> Transform:
    """Resize and channel match: nothing random."""
    return FaceTransform(spec, None)


STRONG = ("trivialaugment", "randaugment")


def strong_augment(images: torch.Tensor, ids: torch.Tensor, kind: str, *, seed: int, epoch: int
                   ) -> torch.Tensor:
    """uint8 faces [N, C, H, W] (already through train_transform) under torchvision's TrivialAugmentWide or
    RandAugment (FixMatch's strong view), each face seeded by (seed, epoch, id) as the weak view is.

    torchvision here, unlike train_transform: these are its published policies (a reimplementation would
    drift from them), and they touch only the unlabelled share of a round's batch, on the main process.
    """
    if kind not in STRONG:
        raise FerDistError(f"method.unlabelled_augment: {kind!r} is not one of {', '.join(STRONG)}")
    from torchvision.transforms import v2  # only the arms that use it pay for the import

    policy = v2.TrivialAugmentWide() if kind == "trivialaugment" else v2.RandAugment()
    out = images.clone()
    seeds = sample_seeds(seed ^ 0x5EED, epoch, ids.numpy())  # another key than the weak view's seeds
    with torch.random.fork_rng(devices=[]):  # the run's own generator (dropout) is left as it was
        for i, face_seed in enumerate(seeds.tolist()):
            torch.manual_seed(face_seed)
            out[i] = policy(images[i])
    return out
