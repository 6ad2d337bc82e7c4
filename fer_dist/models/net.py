"""FerNet (a backbone trunk and METHOD.md section 6's head), building it, and the freezing policy."""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from fer_dist.classes import CLASSES
from fer_dist.data.augment import InputSpec, normalise
from fer_dist.errors import FerDistError
from fer_dist.models.backbones import BACKBONES, Blocks, make_trunk
from fer_dist.models.spec import ModelSpec, parse_trainable

log = logging.getLogger(__name__)

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def make_head(in_features: int, hidden: int, dropout: float, num_classes: int) -> nn.Sequential:
    """FC `hidden` -> ReLU -> dropout -> K-way linear; logits out (the loss and predict apply softmax)."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


class FerNet(nn.Module):
    """Faces [N, C, H, W] -> backbone features [N, F] -> head -> logits [N, K].

    Faces come as uint8 pixels (the loaders' batches; normalised here, on the model's device, with the
    input spec's mean and std) or as float32 already normalised.
    """

    def __init__(self, spec: ModelSpec, backbone: nn.Module, features: int, input_spec: InputSpec) -> None:
        super().__init__()
        self.spec = spec
        self.input_spec = input_spec
        self.backbone = backbone
        self.head = make_head(features, spec.hidden, spec.dropout, spec.num_classes)
        # Class names when known (the 7 canonical ones for K = 7; an export's own list after load_exported).
        self.classes: tuple[str, ...] | None = CLASSES if spec.num_classes == len(CLASSES) else None
        self.trainable = "all"  # the policy in force; apply_trainable sets it

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.input_spec.channels:
            raise FerDistError(f"model: expected images [N, {self.input_spec.channels}, H, W] for "
                               f"{self.spec.backbone}, got {list(images.shape)}")
        if images.dtype == torch.uint8:
            images = normalise(images, self.input_spec)
        return self.head(self.backbone(images))

    def blocks(self) -> Blocks:
        """The backbone's blocks as the freezing policy counts them, first to last."""
        return BACKBONES[self.spec.backbone].blocks(self.backbone)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer should get: those with requires_grad."""
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> FerNet:
        """Set train/eval mode; frozen BatchNorm layers stay in eval so their running stats never move."""
        super().train(mode)
        if mode:
            for m in self.modules():
                params = list(m.parameters(recurse=False))
                if isinstance(m, _BATCH_NORMS) and params and not any(p.requires_grad for p in params):
                    m.eval()
        return self


def assemble_model(spec: ModelSpec, load_weights: bool) -> tuple[FerNet, bool]:
    """FerNet for `spec` with no policy applied, and whether pretrained weights went in."""
    trunk, features, loaded = make_trunk(spec.backbone, spec.pretrained and load_weights, spec.weights)
    default = BACKBONES[spec.backbone].input_spec
    input_spec = dataclasses.replace(default, size=spec.input_size or default.size)
    return FerNet(spec, trunk, features, input_spec), loaded


def build_model(spec: ModelSpec) -> FerNet:
    """The network `spec` describes, with its pretrained weights loaded and its freezing policy applied.

    A backbone that starts from random weights (small_cnn, or pretrained: false) is trained whole: freezing
    random layers would only cripple it, so its policy becomes `all` (logged).
    """
    model, loaded = assemble_model(spec, load_weights=True)
    policy = spec.trainable
    if not loaded and policy != "all":
        log.warning("model.trainable: %s starts from random weights, so all of it is trained (not %s)",
                    spec.backbone, policy)
        policy = "all"
    apply_trainable(model, policy)
    return model


def apply_trainable(model: FerNet, policy: str) -> None:
    """Set requires_grad by `policy` (all | head | last_block | last_n_blocks:N); the head always trains."""
    blocks = model.blocks()
    n = parse_trainable(policy, num_blocks=len(blocks))
    model.backbone.requires_grad_(n is None)
    if n:
        for block in blocks[-n:]:
            for module in block:
                module.requires_grad_(True)
    model.head.requires_grad_(True)
    model.trainable = policy
    model.train(model.training)  # re-derive which BatchNorm layers are frozen


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) numbers of parameter elements."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
