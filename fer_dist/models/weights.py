"""Local weights files: read a state dict without running pickle code; load it with one-line errors."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from fer_dist.errors import FerDistError


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, so a wrapped error stays one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The named tensors of a weights file: safetensors by suffix, else torch.load(weights_only=True)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FerDistError(f"{p}: weights file not found")
    try:
        if p.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(p), device="cpu")
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever the parser trips on, the file is at fault: say which
        raise FerDistError(f"{p}: not a readable weights file ({one_line(exc)})") from exc
    # Some conversions wrap the tensors as {"state_dict": {...}}.
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise FerDistError(f"{p}: not a state dict (a mapping of names to tensors)")
    return dict(state)


def load_checked(
    module: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, ignore: tuple[str, ...] = ()
) -> None:
    """Copy `state` into `module`; the first unexpected, misshapen or missing key is a FerDistError.

    Keys starting with a prefix in `ignore` (the layers the head replaces) may have any shape, or be absent.
    """
    own = module.state_dict()
    for key, value in state.items():
        if key.startswith(ignore):
            continue
        if key not in own:
            raise FerDistError(f"{path}: unexpected key {key!r} (expected keys like {next(iter(own))!r})")
        if value.shape != own[key].shape:
            raise FerDistError(
                f"{path}: {key!r} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    # num_batches_tracked is bookkeeping that files written by older PyTorch versions lack.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise FerDistError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing)")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
