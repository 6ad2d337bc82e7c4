"""Numerical faults: a non-finite step is skipped and counted, too many stop the run, and a checkpoint is
never written from non-finite weights.

The decision reads the gradient norm after `backward`: DDP has averaged the gradients, so every process
sees the same norm and skips the same steps without a collective. That read is the step's one host sync
(the loss stays on the device until it is logged). With fp16 the GradScaler skips overflowing steps itself
(a few are normal while it finds its scale), so nothing is read or counted there.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fer_dist.errors import FerDistError


def grad_norm(accelerator: Any, model: torch.nn.Module, clip: float | None) -> torch.Tensor | None:
    """The total gradient norm (clipping to `clip` where set), or None under a GradScaler (fp16): there an
    overflowing step is the scaler's to skip, and its optimiser step must run for the scale to come down."""
    norm = accelerator.clip_grad_norm_(model.parameters(), clip) if clip else None
    if accelerator.scaler is not None:
        return None
    if norm is None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
    return norm


def allows_step(norm: torch.Tensor | None) -> bool:
    """Whether a step's gradient norm allows the optimiser step (None: the GradScaler decides, no sync)."""
    return norm is None or math.isfinite(float(norm))


def too_many(count: int, limit: int, step: int) -> FerDistError | None:
    """The error that ends a run once more than `limit` steps were non-finite, else None."""
    if count <= limit:
        return None
    return FerDistError(f"optim.max_nonfinite_steps: {count} steps had a non-finite loss or gradient (the "
                        f"last at step {step}, limit {limit}); lower optim.lr, set optim.grad_clip or check "
                        "the data; the checkpoints hold only finite weights")


def check_finite_weights(model: torch.nn.Module, what: str) -> None:
    """FerDistError naming the first non-finite parameter or buffer: such weights are never checkpointed."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FerDistError(f"{what}: refusing to save non-finite weights ({name}); the previous "
                               "checkpoint is intact (resume=auto continues from it)")
