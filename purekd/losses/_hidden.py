"""Losses between hidden states.

Shapes: ``state`` is ``(B, L, D)`` (batch, length, width); ``mask`` is an optional 0/1 tensor
``(B, L)`` (TextBrewer's ``inputs_mask``). Student and teacher widths must agree: project the
student first (a ``proj`` entry in the intermediate match) when they differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from purekd._masked import as_weights, weighted_mean, zero_masked_rows


def hidden_mse(state_S: Tensor, state_T: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Mean squared error between hidden states.

    .. math:: \frac{\sum_{b,l,d} m_{bl} (S_{bld} - T_{bld})^2}{D \sum_{b,l} m_{bl}}

    (with ``m = 1`` everywhere when no mask is given).
    """
    squared = (state_S - state_T).pow(2)
    if mask is None:
        return squared.mean()
    return weighted_mean(squared, as_weights(mask, squared).unsqueeze(-1))


def cos(state_S: Tensor, state_T: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Cosine distance between hidden states, averaged over positions (DistilBERT's loss).

    .. math:: \operatorname{mean}_{(b,l):\,m_{bl}=1}\Big(1 - \frac{S_{bl}\cdot T_{bl}}
              {\sqrt{(\lVert S_{bl}\rVert^2+\epsilon)(\lVert T_{bl}\rVert^2+\epsilon)}}\Big),
              \quad \epsilon = 10^{-12}

    which is :func:`torch.nn.functional.cosine_embedding_loss` with target 1.
    """
    width = state_S.size(-1)
    if mask is not None:
        state_S, state_T = zero_masked_rows(state_S, mask), zero_masked_rows(state_T, mask)
    rows_S = state_S.reshape(-1, width)
    rows_T = state_T.reshape(-1, width)
    target = torch.ones(rows_S.size(0), dtype=rows_S.dtype, device=rows_S.device)
    per_row = F.cosine_embedding_loss(rows_S, rows_T, target, reduction="none")
    if mask is None:
        return per_row.mean()
    return weighted_mean(per_row, as_weights(mask, per_row).reshape(-1))


def pkd(state_S: Tensor, state_T: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Patient-KD loss: squared distance between L2-normalised first-position states.

    .. math:: \operatorname{mean}_b \Big\lVert \frac{s_b}{\lVert s_b\rVert} - \frac{t_b}{\lVert t_b\rVert}\Big\rVert^2

    where ``s_b = S[b, 0]`` for a 3-d state ``(B, L, D)`` and ``s_b = S[b]`` for a 2-d state
    ``(B, D)`` (likewise ``t``). ``mask`` is accepted for a uniform signature and ignored.
    """
    del mask
    cls_S = state_S[:, 0] if state_S.dim() == 3 else state_S
    cls_T = state_T[:, 0] if state_T.dim() == 3 else state_T
    normed_S = cls_S / torch.linalg.vector_norm(cls_S, dim=1, keepdim=True)
    normed_T = cls_T / torch.linalg.vector_norm(cls_T, dim=1, keepdim=True)
    return (normed_S - normed_T).pow(2).sum(dim=-1).mean()


__all__ = ["cos", "hidden_mse", "pkd"]
