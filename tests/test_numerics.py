"""numerics.py alone: the gradient norm that decides a skip, one host copy, the limit, the weights check."""

from __future__ import annotations

import pytest
import torch

from fer_dist import dist, numerics
from fer_dist.errors import FerDistError


@pytest.fixture(scope="module")
def acc():
    return dist.make_accelerator()


def model_with_grads() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    m(torch.randn(4, 3)).sum().backward()
    return m


@pytest.mark.parametrize("clip", [None, 0.5])
def test_the_norm_decides(acc, clip) -> None:
    m = model_with_grads()
    expected = torch.cat([p.grad.reshape(-1) for p in m.parameters()]).norm().item()
    norm = numerics.grad_norm(acc, m, clip)
    assert float(norm) == pytest.approx(expected, rel=1e-5) and numerics.allows_step(norm)
    m.weight.grad[0, 0] = float("inf")
    assert not numerics.allows_step(numerics.grad_norm(acc, m, clip))
    assert numerics.allows_step(None)  # fp16: the scaler's to skip


def test_the_limit_counts_skipped_steps() -> None:
    assert numerics.too_many(3, 3, 40) is None
    error = numerics.too_many(4, 3, 41)
    assert isinstance(error, FerDistError) and "4 steps" in str(error) and "step 41" in str(error)


def test_non_finite_weights_are_named() -> None:
    m = model_with_grads()
    numerics.check_finite_weights(m, "checkpoint x")
    with torch.no_grad():
        m.bias[1] = float("nan")
    with pytest.raises(FerDistError, match=r"checkpoint x: refusing to save non-finite weights \(bias\)"):
        numerics.check_finite_weights(m, "checkpoint x")
