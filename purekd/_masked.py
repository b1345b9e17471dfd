"""Masked reductions shared by the losses and the schedules.

Masks are applied by *weighting*, never by boolean indexing: ``(x * w).sum() / w.sum()``
keeps every shape static, so the losses compile with ``fullgraph=True`` and no graph break.
"""

from __future__ import annotations

import torch
from torch import Tensor


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, with 0 where the denominator is 0.

    When every position is masked both sides are 0; the result is 0 and its gradient is 0
    (never ``0/0 = nan``). For 0/1 masks the value is otherwise exactly the plain quotient.
    """
    nonzero = denominator != 0
    return numerator / torch.where(nonzero, denominator, torch.ones_like(denominator))


def weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """``sum(values * weights) / sum(weights)`` over all elements (0 when all weights are 0).

    ``weights`` broadcasts against ``values``; the denominator counts the weights after
    broadcasting, so a mask of shape ``(B, L)`` against rows of shape ``(B, L)`` is the mean
    over the selected rows.
    """
    weights = torch.broadcast_to(weights, values.shape)
    return safe_divide((values * weights).sum(), weights.sum())


def as_weights(mask: Tensor, like: Tensor) -> Tensor:
    """A 0/1 (bool, int or float) mask as a floating tensor with the dtype and device of ``like``."""
    return mask.to(device=like.device, dtype=like.dtype)
