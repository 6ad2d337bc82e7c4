"""The two trunks fer-dist defines itself: VGG-Face's conv layers and a small CNN for 48x48 greyscale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# VGG-16's 13 conv layers in 5 blocks, named as in the public PyTorch conversion of VGG-Face, so that its
# state dict loads key for key ("conv1_1.weight", ...). Each block ends with a 2x2 max-pool.
VGG_BLOCKS: tuple[tuple[str, ...], ...] = (
    ("conv1_1", "conv1_2"),
    ("conv2_1", "conv2_2"),
    ("conv3_1", "conv3_2", "conv3_3"),
    ("conv4_1", "conv4_2", "conv4_3"),
    ("conv5_1", "conv5_2", "conv5_3"),
)
VGG_WIDTHS: tuple[int, ...] = (64, 128, 256, 512, 512)
# The fully connected layers of the conversion; the head replaces them, so a weights file may hold them
# with any shape.
VGG_FC_PREFIXES: tuple[str, ...] = ("fc6.", "fc7.", "fc8.")


class VGGFaceTrunk(nn.Module):
    """VGG-Face without fc6-fc8: [N, 3, H, W] -> [N, 512 * 7 * 7], the input fc6 had."""

    def __init__(self) -> None:
        super().__init__()
        in_ch = 3
        for names, width in zip(VGG_BLOCKS, VGG_WIDTHS, strict=True):
            for name in names:
                conv = nn.Conv2d(in_ch, width, kernel_size=3, padding=1)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
                setattr(self, name, conv)
                in_ch = width
        # At 224 px the last pool gives 7x7 and this is the identity; at smaller inputs it replicates cells
        # so the head keeps fc6's input layout (as torchvision's VGG does).
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.out_features = VGG_WIDTHS[-1] * 7 * 7

    def blocks(self) -> list[list[nn.Module]]:
        """The 5 conv blocks, in order."""
        return [[getattr(self, name) for name in names] for names in VGG_BLOCKS]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for names in VGG_BLOCKS:
            for name in names:
                x = F.relu(getattr(self, name)(x), inplace=True)
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        return torch.flatten(self.pool(x), 1)


def _conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    # No conv bias: the BatchNorm right after it has its own shift.
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """4 blocks of 2 x (conv3x3-BN-ReLU) + 2x2 max-pool, then a global average pool: [N, C, H, W] -> [N, 128].

    Sized for 48x48 greyscale faces on a CPU (48 -> 24 -> 12 -> 6 -> 3 px); trained from scratch.
    """

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        blocks = []
        for width in widths:
            blocks.append(nn.Sequential(_conv_bn_relu(in_channels, width), _conv_bn_relu(width, width),
                                        nn.MaxPool2d(2)))
            in_channels = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def blocks(self) -> list[list[nn.Module]]:
        """Its conv blocks, in order."""
        return [[block] for block in self.features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)
