"""ModelSpec: everything needed to rebuild a network (derived from config.ModelConfig), validated on creation;
the freezing-policy grammar."""

from __future__ import annotations

import copy
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from fer_dist.classes import NUM_CLASSES
from fer_dist.config import TRAINING_ONLY_MODEL_KEYS, ModelConfig
from fer_dist.errors import FerDistError
from fer_dist.models.backbones import BACKBONES

POLICIES = "all | head | last_block | last_n_blocks:N"


class _Frozen(BaseModel):
    # strict: a spec read back from an export's JSON takes no "7" for 7 nor true for 1
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _spec_fields() -> dict[str, Any]:
    """ModelConfig's fields (their one declaration: type, default, bounds, doc) less those that say how the
    network is trained, with num_classes second: the order of an export's `model` in meta.json."""
    fields = {name: (f.annotation, copy.copy(f)) for name, f in ModelConfig.model_fields.items()
              if name not in TRAINING_ONLY_MODEL_KEYS}
    backbone = fields.pop("backbone")
    classes = (int, Field(NUM_CLASSES, ge=2, description="K, the number of outputs"))
    return {"backbone": backbone, "num_classes": classes, **fields}


class ModelSpec(create_model("_ModelSpecFields", __base__=_Frozen, **_spec_fields())):  # type: ignore[misc]
    """Everything needed to rebuild a network: a training config's `model` section without its training-only
    keys, plus num_classes; checked against the backbone on creation (errors name the `model.` key)."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise FerDistError(_one_line(e)) from None

    @model_validator(mode="after")
    def _fits_the_backbone(self) -> ModelSpec:
        if self.backbone not in BACKBONES:
            raise FerDistError(f"model.backbone: unknown backbone {self.backbone!r} "
                               f"(known: {', '.join(BACKBONES)})")
        min_size = BACKBONES[self.backbone].min_size
        if self.input_size is not None and self.input_size < min_size:
            raise FerDistError(f"model.input_size: {self.input_size} is below {self.backbone}'s minimum "
                               f"{min_size}")
        parse_trainable(self.trainable)
        if self.backbone == "vggface" and self.pretrained and not self.weights:
            raise FerDistError("model.weights: vggface with pretrained: true needs the VGG-Face weights file "
                               "(keys conv1_1.weight .. fc8.bias), or set model.pretrained: false")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (an export's `model`)."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> ModelSpec:
        """A spec from `to_dict`'s output; unknown keys and wrong types are errors (prefixed by `source`)."""
        prefix = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise FerDistError(f"{prefix}model: expected a mapping, got {type(data).__name__}")
        try:
            return cls(**data)
        except FerDistError as exc:
            raise FerDistError(f"{prefix}{exc}") from None


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"model.{key}: unknown key (known: {', '.join(ModelSpec.model_fields)})"
    return f"model.{key}: {first['msg'].removeprefix('Value error, ')} (got {first.get('input')!r})"


def parse_trainable(policy: str, num_blocks: int | None = None) -> int | None:
    """How many of the last blocks train under `policy`: None for all (stem included), 0 for the head only.

    With `num_blocks`, N of last_n_blocks:N must also be at most the backbone's number of blocks.
    """
    if policy == "all":
        return None
    if policy == "head":
        return 0
    if policy == "last_block":
        n = 1
    else:
        match = re.fullmatch(r"last_n_blocks:([0-9]+)", policy)
        if match is None or int(match[1]) < 1:
            raise FerDistError(f"model.trainable: {policy!r} is not one of {POLICIES} (N >= 1)")
        n = int(match[1])
    if num_blocks is not None and n > num_blocks:
        raise FerDistError(f"model.trainable: {policy!r} asks for {n} blocks; the backbone has {num_blocks}")
    return n
