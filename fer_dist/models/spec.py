"""ModelSpec: everything needed to rebuild a network, validated on creation; the freezing-policy grammar."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from fer_dist.errors import FerDistError
from fer_dist.models.backbones import BACKBONES

POLICIES = "all | head | last_block | last_n_blocks:N"


@dataclass(frozen=True)
class ModelSpec:
    """The network: backbone, head and what is trained (defaults: METHOD.md section 6)."""

    backbone: str = "small_cnn"  # a name in BACKBONES
    num_classes: int = 7  # K
    pretrained: bool = True  # start from published weights (torchvision's, or the `weights` file)
    weights: str | None = None  # local weights file; required for vggface when pretrained
    trainable: str = "last_block"  # all | head | last_block | last_n_blocks:N
    input_size: int | None = None  # square side in pixels; None: the backbone's default
    hidden: int = 128  # units of the head's FC layer
    dropout: float = 0.6  # dropout after that layer

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise FerDistError(f"model.backbone: unknown backbone {self.backbone!r} "
                               f"(known: {', '.join(BACKBONES)})")
        if self.num_classes < 2:
            raise FerDistError(f"model.num_classes: {self.num_classes} is below 2")
        if self.hidden < 1:
            raise FerDistError(f"model.hidden: {self.hidden} is below 1")
        if not 0.0 <= self.dropout < 1.0:
            raise FerDistError(f"model.dropout: {self.dropout} is not in [0, 1)")
        min_size = BACKBONES[self.backbone].min_size
        if self.input_size is not None and self.input_size < min_size:
            raise FerDistError(f"model.input_size: {self.input_size} is below {self.backbone}'s minimum "
                               f"{min_size}")
        parse_trainable(self.trainable)
        if self.backbone == "vggface" and self.pretrained and not self.weights:
            raise FerDistError("model.weights: vggface with pretrained: true needs the VGG-Face weights file "
                               "(keys conv1_1.weight .. fc8.bias), or set model.pretrained: false")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> ModelSpec:
        """A spec from `to_dict`'s output; unknown keys and wrong types are errors (prefixed by `source`)."""
        prefix = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise FerDistError(f"{prefix}model: expected a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if key not in hints:
                raise FerDistError(f"{prefix}model.{key}: unknown key (known: {', '.join(hints)})")
            if not _has_type(value, hints[key]):
                raise FerDistError(f"{prefix}model.{key}: {value!r} is not of type {_type_name(hints[key])}")
        try:
            return cls(**data)
        except FerDistError as exc:
            raise FerDistError(f"{prefix}{exc}") from None


def _has_type(value: Any, hint: Any) -> bool:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if isinstance(value, bool):  # bool is an int subclass; only a bool field takes it
        return bool in allowed
    if float in allowed and isinstance(value, int):
        return True
    return isinstance(value, tuple(allowed))


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


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
