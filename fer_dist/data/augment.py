"""METHOD.md section 6 augmentation and the model's resize/normalise, as torchvision.transforms.v2 pipelines.

A transform takes one decoded face, a uint8 tensor [C, H, W] with C = 1 (grey) or 3 (RGB, in that order),
and returns a float tensor [spec.channels, spec.size, spec.size], normalised with the model's mean and std.

Stage order (train): horizontal flip -> one affine warp (rotation within +-10 degrees, shifts strictly under
10 % of the side in x and y, slight zoom in 1.0 - 1.1) -> resize to the model's side -> channel match ->
float in [0, 1] -> normalise. The geometry is applied before the resize so that a small face is warped at its
own size (cheaper, and the model's resize then smooths the warp), and the channel match comes after the
resize so grey faces are resized once, not three times.

The random stages draw from torch's global generator. They do not seed it: the stream does, once per batch
from (seed, epoch, rank, worker role, batch index), so a resumed run draws the same augmentations
(see fer_dist/data/stream.py). The transforms are plain picklable modules so DataLoader workers can use them
under fork or spawn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import torch
from torchvision.transforms import v2

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


class MatchChannels(torch.nn.Module):
    """Grey -> RGB by repeating the plane, RGB -> grey by luma; anything else passes unchanged."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        have = image.shape[-3]
        if have == self.channels:
            return image
        if have == 1 and self.channels == 3:
            return image.expand(3, *image.shape[-2:]).contiguous()
        if have == 3 and self.channels == 1:
            return v2.functional.rgb_to_grayscale(image, num_output_channels=1)
        raise FerDistError(f"cannot turn a {have}-channel image into {self.channels} channels")

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class RandomAffineCV(torch.nn.Module):
    """v2.RandomAffine's draw (rotation, translation, scale; fill 0) applied with OpenCV's warpAffine.

    Same parameters from torch's global generator, so seeding and resumes work alike; torchvision's warp
    (a grid_sample) cost 350-400 us on a 48 px face against ~20 us here, most of the stream's CPU time.
    """

    def __init__(self, degrees: float, translate: float, scale: tuple[float, float]) -> None:
        super().__init__()
        self.degrees, self.translate, self.scale = degrees, translate, scale

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        c, h, w = image.shape
        draws = torch.rand(4).tolist()
        angle = (2 * draws[0] - 1) * self.degrees
        tx = round((2 * draws[1] - 1) * self.translate * w)
        ty = round((2 * draws[2] - 1) * self.translate * h)
        zoom = self.scale[0] + draws[3] * (self.scale[1] - self.scale[0])
        # Rotation and zoom about the centre, then the shift: v2.RandomAffine's order.
        matrix = cv2.getRotationMatrix2D(((w - 1) * 0.5, (h - 1) * 0.5), angle, zoom)
        matrix[:, 2] += (tx, ty)
        pixels = image[0].numpy() if c == 1 else image.permute(1, 2, 0).numpy()
        warped = cv2.warpAffine(pixels, matrix, (w, h), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        out = torch.from_numpy(warped)
        return out[None] if c == 1 else out.permute(2, 0, 1).contiguous()

    def extra_repr(self) -> str:
        return f"degrees={self.degrees}, translate={self.translate}, scale={self.scale}"


def _finish(spec: InputSpec) -> list[torch.nn.Module]:
    """The deterministic tail shared by both pipelines: resize, channel match, float, normalise."""
    return [
        v2.Resize((spec.size, spec.size), antialias=True),
        MatchChannels(spec.channels),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(spec.mean), list(spec.std)),
    ]


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
    stages: list[torch.nn.Module] = [v2.RandomHorizontalFlip(0.5)] if flip else []
    stages.append(RandomAffineCV(rotation, shift, zoom))
    return v2.Compose(stages + _finish(spec))


def eval_transform(spec: InputSpec) -> Transform:
    """Resize, channel match, normalise: nothing random."""
    return v2.Compose(_finish(spec))
