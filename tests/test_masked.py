"""``purekd._masked.weighted_mean``: the expanded formula, without expanding the weights."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from purekd._masked import weighted_mean


def _expanded(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    full = torch.broadcast_to(weights, values.shape).double()
    return (values.double() * full).sum() / full.sum()


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), seed=st.integers(0, 2**16),
       pattern=st.integers(0, 15), fractional=st.booleans())
def test_equals_the_expanded_formula(shape: list[int], seed: int, pattern: int,
                                     fractional: bool) -> None:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    # weights keep some dimensions and broadcast along the others (size 1), maybe fewer dims
    weight_shape = [n if pattern >> d & 1 else 1 for d, n in enumerate(shape)]
    drop = min(pattern % 3, len(shape) - 1)
    if all(n == 1 for n in weight_shape[:drop]):
        weight_shape = weight_shape[drop:]
    weights = (torch.rand(weight_shape, generator=generator, dtype=torch.float64) > 0.3).double()
    if fractional:
        weights = weights * torch.rand(weight_shape, generator=generator, dtype=torch.float64)
    if weights.sum() == 0:
        assert weighted_mean(values, weights).item() == 0.0
        return
    torch.testing.assert_close(weighted_mean(values, weights), _expanded(values, weights))


def test_non_finite_values_under_zero_weights_leave_value_and_gradient_finite() -> None:
    values = torch.randn(2, 3, 4, requires_grad=True)
    poisoned = values.detach().clone()
    poisoned[1, 2] = math.nan
    poisoned[0, 0, 1] = math.inf
    mask = torch.ones(2, 3, 1)
    mask[1, 2] = mask[0, 0] = 0
    poisoned.requires_grad_(True)
    result = weighted_mean(poisoned, mask)
    kept = torch.cat([poisoned[0, 1:].reshape(-1), poisoned[1, :2].reshape(-1)])
    torch.testing.assert_close(result, kept.mean())
    result.backward()
    assert poisoned.grad is not None and torch.isfinite(poisoned.grad).all()
    assert poisoned.grad[1, 2].eq(0).all() and poisoned.grad[0, 0].eq(0).all()


def test_all_zero_weights_give_zero() -> None:
    assert weighted_mean(torch.randn(3, 5), torch.zeros(3, 1)).item() == 0.0


def test_weights_that_do_not_broadcast_are_refused() -> None:
    with pytest.raises(ValueError, match=r"weights of shape \(3, 2\) do not broadcast"):
        weighted_mean(torch.randn(3, 5), torch.ones(3, 2))
