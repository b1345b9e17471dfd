"""Losses between attention matrices.

Shapes: ``attention`` is ``(B, H, L, L)`` (batch, heads, query, key) or ``(B, L, L)``; a 3-d
attention is treated as a single head. ``mask`` is an optional 0/1 tensor ``(B, L)`` over
positions (TextBrewer's ``inputs_mask``): a masked query row and a masked key column both drop
out.

Without a mask, TextBrewer's convention applies: entries ``<= -1e-3`` mark padding (attention
scores with a large negative additive mask) and count as zero — for the MSE losses on both
sides, for the cross-entropy losses in the teacher's probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from purekd._masked import as_weights, safe_divide

PADDING_THRESHOLD = -1e-3
"""Unmasked attention entries at or below this value are treated as padding."""


def _as_4d(attention: Tensor) -> Tensor:
    return attention if attention.dim() == 4 else attention.unsqueeze(1)


def _zero_padding(attention: Tensor, values: Tensor) -> Tensor:
    return torch.where(attention <= PADDING_THRESHOLD, torch.zeros_like(values), values)


def _pair_weights(mask: Tensor, like: Tensor) -> Tensor:
    """``m_i * m_j`` of shape ``(B, 1, L, L)`` for a ``(B, L)`` position mask."""
    m = as_weights(mask, like)
    return (m.unsqueeze(-1) * m.unsqueeze(-2)).unsqueeze(1)


def _masked_pair_mse(attention_S: Tensor, attention_T: Tensor, mask: Tensor) -> Tensor:
    """``sum_{b,h,i,j} m_i m_j (S-T)^2 / sum_{b,h} (sum_i m_i)^2`` for 4-d inputs."""
    squared = (attention_S - attention_T).pow(2)
    pair = _pair_weights(mask, squared)
    heads = attention_S.size(1)
    valid = as_weights(mask, squared).sum(dim=-1).pow(2).sum() * heads
    return safe_divide((squared * pair).sum(), valid)


def _masked_row_ce(attention_S: Tensor, attention_T: Tensor, mask: Tensor) -> Tensor:
    """``-sum_{b,h,i} m_i sum_j m_j p^T_ij log p^S_ij / (H * sum m)`` for 4-d inputs."""
    cross = F.softmax(attention_T, dim=-1) * F.log_softmax(attention_S, dim=-1)
    m = as_weights(mask, cross)
    per_row = (cross * m[:, None, None, :]).sum(dim=-1)  # (B, H, L)
    heads = attention_S.size(1)
    return -safe_divide((per_row * m[:, None, :]).sum(), m.sum() * heads)


def attention_mse(attention_S: Tensor, attention_T: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Mean squared error between attention matrices, head by head.

    Without a mask: :math:`\operatorname{mean}(\tilde S - \tilde T)^2`, where :math:`\tilde X`
    zeroes the entries ``<= -1e-3``. With a mask ``m`` of shape ``(B, L)``:

    .. math:: \frac{\sum_{b,h,i,j} m_{bi} m_{bj} (S_{bhij} - T_{bhij})^2}{H \sum_b (\sum_i m_{bi})^2}
    """
    if mask is None:
        return F.mse_loss(_zero_padding(attention_S, attention_S),
                          _zero_padding(attention_T, attention_T))
    return _masked_pair_mse(_as_4d(attention_S), _as_4d(attention_T), mask)


def attention_mse_sum(attention_S: Tensor, attention_T: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Mean squared error between attention matrices summed over heads.

    A 4-d input ``(B, H, L, L)`` is first summed over ``H`` to ``(B, L, L)``; then as
    :func:`attention_mse` with a single head:

    .. math:: \frac{\sum_{b,i,j} m_{bi} m_{bj} (\Sigma_h S - \Sigma_h T)_{bij}^2}{\sum_b (\sum_i m_{bi})^2}
    """
    if attention_S.dim() == 4:
        attention_S = attention_S.sum(dim=1)
        attention_T = attention_T.sum(dim=1)
    return attention_mse(attention_S, attention_T, mask)


def attention_ce(attention_S: Tensor, attention_T: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Cross-entropy between attention distributions (softmax over the key axis), per head.

    Without a mask: :math:`-\operatorname{mean}_{b,h,i} \sum_j \tilde p^T_{bhij} \log p^S_{bhij}`,
    where :math:`\tilde p^T` is zero wherever the teacher's attention is ``<= -1e-3``. With a
    mask ``m`` of shape ``(B, L)``:

    .. math:: -\frac{\sum_{b,h,i} m_{bi} \sum_j m_{bj}\, p^T_{bhij} \log p^S_{bhij}}{H \sum_{b,i} m_{bi}}
    """
    if mask is None:
        p_T = _zero_padding(attention_T, F.softmax(attention_T, dim=-1))
        return -(p_T * F.log_softmax(attention_S, dim=-1)).sum(dim=-1).mean()
    return _masked_row_ce(_as_4d(attention_S), _as_4d(attention_T), mask)


def attention_ce_mean(attention_S: Tensor, attention_T: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy between attention distributions averaged over heads.

    A 4-d input ``(B, H, L, L)`` is first averaged over ``H``; then as :func:`attention_ce`
    with a single head.
    """
    if attention_S.dim() == 4:
        attention_S = attention_S.mean(dim=1)
        attention_T = attention_T.mean(dim=1)
    return attention_ce(attention_S, attention_T, mask)


__all__ = ["PADDING_THRESHOLD", "attention_ce", "attention_ce_mean", "attention_mse",
           "attention_mse_sum"]
