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
    broadcasting, so a mask of shape ``(B, L, 1)`` against values ``(B, L, D)`` is the mean
    over the ``D`` entries of the selected rows. Values where the weight is 0 are dropped with
    ``torch.where`` first, so a NaN or infinity in a masked position does not leak into the
    result.

    The weights are never expanded: ``values`` is first summed over the dimensions along which
    ``weights`` broadcasts (the weight is constant there), so the masking and weighting run on
    ``weights``' shape — ``(B, L)`` rows instead of ``(B, L, D)`` elements.
    """
    trailing = zip(reversed(weights.shape), reversed(values.shape), strict=False)
    if weights.dim() > values.dim() or any(w not in (1, v) for w, v in trailing):
        raise ValueError(f"weights of shape {tuple(weights.shape)} do not broadcast to values "
                         f"of shape {tuple(values.shape)}")
    weights = weights.reshape((1,) * (values.dim() - weights.dim()) + tuple(weights.shape))
    spread = [d for d in range(values.dim()) if weights.size(d) == 1 and values.size(d) != 1]
    copies = 1
    for d in spread:
        copies *= values.size(d)
    if spread:
        values = values.sum(dim=spread, keepdim=True)
    kept = torch.where(weights != 0, values, torch.zeros((), dtype=values.dtype,
                                                         device=values.device))
    return safe_divide((kept * weights).sum(), weights.sum() * copies)


def zero_masked_rows(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` with every row whose ``mask`` entry is 0 replaced by zeros.

    ``mask`` has shape ``values.shape[:-1]``. Used before any arithmetic on rows that a mask
    removes, so non-finite values there affect neither the loss nor its gradient (the gradient
    of those rows is exactly 0), as if the rows had been removed by boolean selection.
    """
    keep = (mask != 0).unsqueeze(-1)
    return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))


def as_weights(mask: Tensor, like: Tensor) -> Tensor:
    """A 0/1 (bool, int or float) mask as a floating tensor with the dtype and device of ``like``."""
    return mask.to(device=like.device, dtype=like.dtype)
