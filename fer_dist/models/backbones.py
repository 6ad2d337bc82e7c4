"""The backbone registry: how each trunk is built, where its weights come from, and what its blocks are.

A trunk maps normalised images [N, C, H, W] to features [N, F]; the backbone's own classifier is gone
(the head replaces it). "Blocks" are what the freezing policy counts from the end:

- vggface: its 5 conv blocks (conv1_* .. conv5_*), each ending in a max-pool.
- resnet18/34/50: layer1 .. layer4. The stem (conv1, bn1) is in no block.
- mobilenet_v2, mobilenet_v3_large: `features` grouped by output resolution (/2, /4, /8, /16, /32), like
  VGG's blocks: v2 features[1], [2:4], [4:7], [7:14], [14:19]; v3 features[1], [2:4], [4:7], [7:13], [13:17].
  The last block ends with the final 1x1 conv. The stem features[0] is in no block.
- efficientnet_b0: its stages features[1] .. features[7]; the final 1x1 conv features[8] joins the last.
- convnext_tiny: its 4 stages, each with the downsampling layer before it; the classifier's LayerNorm
  (pretrained, kept) joins the last. The stem features[0] is in no block.
- dlib_resnet: its 5 stages of residual units (dlib's alevel4 .. alevel0: 32, 64, 128, 256, 256 wide), as
  torchvision's ResNets' layer1 .. layer4. The stem (7x7 conv, affine, max pool) is in no block.
- small_cnn: its 4 conv blocks.
Stems are trained only under `trainable: all`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fer_dist.data.augment import InputSpec
from fer_dist.errors import FerDistError
from fer_dist.models import dlib_resnet as dlib
from fer_dist.models.trunks import VGG_FC_PREFIXES, SmallCNN, VGGFaceTrunk
from fer_dist.models.weights import load_checked, one_line, read_state_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The VGG-Face conversion subtracts this RGB mean from pixels in 0..255 and does not scale them. On [0, 1]
# pixels, (x - mean/255) / (1/255) = 255 x - mean: exactly the numbers the network was trained on.
VGGFACE_MEAN_255 = (129.186279296875, 104.76238250732422, 93.59396362304688)
VGGFACE_MEAN = tuple(m / 255 for m in VGGFACE_MEAN_255)
VGGFACE_STD = (1 / 255,) * 3

Blocks = list[list[nn.Module]]


@dataclass(frozen=True)
class Backbone:
    """One registry entry."""

    # The trunk (with these torchvision weights when given) and its feature width F.
    make: Callable[[Any], tuple[nn.Module, int]]
    blocks: Callable[[nn.Module], Blocks]  # the trunk's blocks for the freezing policy, first to last
    input_spec: InputSpec  # at the backbone's default size
    imagenet: str | None = None  # torchvision's published weights (their enum's name), loaded when pretrained
    head_prefixes: tuple[str, ...] = ()  # keys of the replaced classifier: ignored in a weights file
    min_size: int = 32  # five stride-2 stages need at least 32 px
    find_weights: Callable[[], Path] | None = None  # the published weights file of an installed package
    read_weights: Callable[[Path], dict[str, torch.Tensor]] = read_state_file  # the weights file's format


def _torchvision(ctor: str, strip: Callable[[nn.Module], int]) -> Callable:
    def make(weights: Any) -> tuple[nn.Module, int]:
        model = getattr(_tvm(), ctor)(weights=weights)
        return model, strip(model)
    return make


def _tvm() -> Any:
    """torchvision.models, imported by the backbones that need it: torchvision's import pulls in torch's
    compiler stack (~2 CPU-s), which a small_cnn run, a loader worker's fork server and an evaluation
    command otherwise pay for nothing."""
    import torchvision.models

    return torchvision.models


def _imagenet_weights(enum: str) -> Any:
    return getattr(_tvm(), enum).IMAGENET1K_V1


def _strip_fc(m: nn.Module) -> int:
    n = m.fc.in_features
    m.fc = nn.Identity()
    return n


def _strip_classifier(index: int) -> Callable[[nn.Module], int]:
    # The whole classifier goes; `index` is the Linear that reads the pooled features.
    def strip(m: nn.Module) -> int:
        n = m.classifier[index].in_features
        m.classifier = nn.Identity()
        return n
    return strip


def _strip_convnext(m: nn.Module) -> int:
    # Keep the pretrained LayerNorm and the Flatten; only the 1000-way Linear goes.
    n = m.classifier[2].in_features
    m.classifier[2] = nn.Identity()
    return n


def _feature_spans(*spans: tuple[int, int]) -> Callable[[nn.Module], Blocks]:
    return lambda m: [list(m.features[a:b]) for a, b in spans]


def _resnet_blocks(m: nn.Module) -> Blocks:
    return [[m.layer1], [m.layer2], [m.layer3], [m.layer4]]


def _efficientnet_blocks(m: nn.Module) -> Blocks:
    return [[m.features[i]] for i in range(1, 7)] + [[m.features[7], m.features[8]]]


def _convnext_blocks(m: nn.Module) -> Blocks:
    f = m.features
    return [[f[1]], [f[2], f[3]], [f[4], f[5]], [f[6], f[7], m.classifier[0]]]


def _own(cls: type[nn.Module]) -> Callable[[Any], tuple[nn.Module, int]]:
    def make(_: Any) -> tuple[nn.Module, int]:
        trunk = cls()
        return trunk, trunk.out_features
    return make


_IMAGENET = InputSpec(224, 3, IMAGENET_MEAN, IMAGENET_STD)
# dlib subtracts its mean from 0..255 pixels and divides by 256: on [0, 1] pixels, mean/255 and std 256/255.
_DLIB = InputSpec(dlib.DLIB_SIZE, 3, tuple(m / 255 for m in dlib.DLIB_MEAN_255), (256 / 255,) * 3)
# IMAGENET1K_V1 everywhere (not DEFAULT, which is V2 for resnet50 and the MobileNets): the classic weights,
# and the MobileNetV2 file that ../shared/torch_home holds.
BACKBONES: dict[str, Backbone] = {
    "vggface": Backbone(_own(VGGFaceTrunk), lambda t: t.blocks(),
                        InputSpec(224, 3, VGGFACE_MEAN, VGGFACE_STD), head_prefixes=VGG_FC_PREFIXES),
    "dlib_resnet": Backbone(_own(dlib.DlibResNet), lambda t: t.blocks(), _DLIB, min_size=dlib.MIN_SIZE,
                            find_weights=dlib.find_dat_file, read_weights=dlib.read_dat_state),
    "small_cnn": Backbone(_own(SmallCNN), lambda t: t.blocks(), InputSpec(48, 1, (0.5,), (0.5,)),
                          min_size=16),
    "resnet18": Backbone(_torchvision("resnet18", _strip_fc), _resnet_blocks, _IMAGENET,
                         "ResNet18_Weights", ("fc.",)),
    "resnet34": Backbone(_torchvision("resnet34", _strip_fc), _resnet_blocks, _IMAGENET,
                         "ResNet34_Weights", ("fc.",)),
    "resnet50": Backbone(_torchvision("resnet50", _strip_fc), _resnet_blocks, _IMAGENET,
                         "ResNet50_Weights", ("fc.",)),
    "mobilenet_v2": Backbone(_torchvision("mobilenet_v2", _strip_classifier(1)),
                             _feature_spans((1, 2), (2, 4), (4, 7), (7, 14), (14, 19)), _IMAGENET,
                             "MobileNet_V2_Weights", ("classifier.",)),
    "mobilenet_v3_large": Backbone(_torchvision("mobilenet_v3_large", _strip_classifier(0)),
                                   _feature_spans((1, 2), (2, 4), (4, 7), (7, 13), (13, 17)), _IMAGENET,
                                   "MobileNet_V3_Large_Weights", ("classifier.",)),
    "efficientnet_b0": Backbone(_torchvision("efficientnet_b0", _strip_classifier(1)), _efficientnet_blocks,
                                _IMAGENET, "EfficientNet_B0_Weights", ("classifier.",)),
    "convnext_tiny": Backbone(_torchvision("convnext_tiny", _strip_convnext), _convnext_blocks, _IMAGENET,
                              "ConvNeXt_Tiny_Weights", ("classifier.2.",)),
}


def make_trunk(name: str, pretrained: bool, weights: str | None) -> tuple[nn.Module, int, bool]:
    """The trunk of backbone `name`, its feature width, and whether pretrained weights went into it.

    pretrained with a `weights` file: that file (the backbone's own key layout and format; classifier keys
    ignored). pretrained without one: the file of an installed package (dlib_resnet), or torchvision's
    ImageNet weights from $TORCH_HOME (downloaded if missing); small_cnn has none and starts from scratch.
    """
    backbone = BACKBONES[name]
    if pretrained and weights is None and backbone.find_weights is not None:
        weights = str(backbone.find_weights())
    if not pretrained or (weights is None and backbone.imagenet is None):
        trunk, features = backbone.make(None)
        return trunk, features, False
    if weights is not None:
        trunk, features = backbone.make(None)
        path = Path(weights).expanduser()
        load_checked(trunk, backbone.read_weights(path), path, backbone.head_prefixes)
        return trunk, features, True
    imagenet = _imagenet_weights(backbone.imagenet)
    try:
        trunk, features = backbone.make(imagenet)
    except Exception as exc:  # no network, a refused download or a damaged file all end here
        raise FerDistError(_imagenet_error(name, imagenet, exc)) from exc
    return trunk, features, True


def _imagenet_error(name: str, weights: Any, exc: Exception) -> str:
    file = weights.url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / file
    if path.exists():
        return (f"{path}: cannot load {name}'s ImageNet weights ({one_line(exc)}); replace it with "
                f"{weights.url} or set model.pretrained: false")
    return (f"{name}: ImageNet weights {file} not found and not downloadable ({one_line(exc)}); place it in "
            f"{path.parent} (set TORCH_HOME to choose the folder) or set model.pretrained: false")
