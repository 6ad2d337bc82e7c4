"""Backbones, METHOD.md section 6's head, the freezing policy, and export/import (safetensors + JSON).

    spec = ModelSpec(backbone="mobilenet_v2", input_size=48)
    model = build_model(spec)            # FerNet: .backbone, .head, .input_spec, .spec
    logits = model(images)               # [N, C, H, W] uint8 pixels (or normalised floats) -> [N, K]
    export_model(model, "out/model");  model = load_exported("out/model")
"""

from fer_dist.models.backbones import BACKBONES
from fer_dist.models.export import export_model, load_exported, preprocessing_of, read_export_meta
from fer_dist.models.net import FerNet, apply_trainable, build_model, count_parameters
from fer_dist.models.spec import ModelSpec, parse_trainable

__all__ = [
    "BACKBONES",
    "FerNet",
    "ModelSpec",
    "apply_trainable",
    "build_model",
    "count_parameters",
    "export_model",
    "load_exported",
    "parse_trainable",
    "preprocessing_of",
    "read_export_meta",
]
