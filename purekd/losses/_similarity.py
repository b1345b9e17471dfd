"""Losses between similarity (Gram) matrices of two layers.

Each takes a *pair* of states from the student and a pair from the teacher — ``state_S =
(S_0, S_1)``, ``state_T = (T_0, T_1)`` — each of shape ``(B, L, D)``; ``mask`` is an optional
0/1 tensor ``(B, L)``. They compare how two layers relate, not the layers themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from purekd._masked import as_weights, safe_divide


def fsp(state_S: Sequence[Tensor], state_T: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    r"""FSP (flow of solution procedure) loss: MSE between width-by-width Gram matrices.

    .. math::

        G^S_b = \frac{S_{0,b}^\top S_{1,b}}{n_b}, \quad
        G^T_b = \frac{T_{0,b}^\top T_{1,b}}{n_b}, \quad
        \mathcal{L} = \operatorname{mean}(G^S - G^T)^2

    with :math:`G_b` of shape ``(D, D)``, :math:`n_b = L` without a mask and
    :math:`n_b = \sum_l m_{bl}` with one (masked positions are zeroed first). Student and
    teacher widths must agree. Also available as ``gram``.
    """
    S0, S1 = state_S[0], state_S[1]
    T0, T1 = state_T[0], state_T[1]
    if mask is None:
        length = S1.size(1)
        gram_S = torch.bmm(S0.transpose(1, 2), S1) / length
        gram_T = torch.bmm(T0.transpose(1, 2), T1) / length
    else:
        m = as_weights(mask, S0).unsqueeze(-1)  # (B, L, 1)
        lengths = m.sum(dim=1, keepdim=True)  # (B, 1, 1)
        gram_S = safe_divide(torch.bmm((S0 * m).transpose(1, 2), S1 * m), lengths)
        gram_T = safe_divide(torch.bmm((T0 * m).transpose(1, 2), T1 * m), lengths)
    return F.mse_loss(gram_S, gram_T)


def mmd(state_S: Sequence[Tensor], state_T: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    r"""NST / MMD-style loss: MSE between position-by-position Gram matrices.

    .. math::

        G^S_b = \frac{S_{0,b} S_{1,b}^\top}{c_S}, \quad
        G^T_b = \frac{T_{0,b} T_{1,b}^\top}{c_T}

    with :math:`G_b` of shape ``(L, L)``, so student and teacher widths may differ. Without a
    mask :math:`c = D` (each side's own width) and :math:`\mathcal{L} = \operatorname{mean}(G^S -
    G^T)^2`. With a mask, as in TextBrewer, :math:`c = L` and

    .. math:: \mathcal{L} = \frac{\sum_{b,i,j} m_{bi} m_{bj} (G^S - G^T)_{bij}^2}{\sum_b (\sum_i m_{bi})^2}

    Also available as ``nst``.
    """
    S0, S1 = state_S[0], state_S[1]
    T0, T1 = state_T[0], state_T[1]
    if mask is None:
        gram_S = torch.bmm(S0, S1.transpose(1, 2)) / S1.size(2)
        gram_T = torch.bmm(T0, T1.transpose(1, 2)) / T1.size(2)
        return F.mse_loss(gram_S, gram_T)
    gram_S = torch.bmm(S0, S1.transpose(1, 2)) / S1.size(1)
    gram_T = torch.bmm(T0, T1.transpose(1, 2)) / T1.size(1)
    squared = (gram_S - gram_T).pow(2)
    m = as_weights(mask, squared)
    pair = m.unsqueeze(-1) * m.unsqueeze(-2)
    valid = m.sum(dim=1).pow(2).sum()
    return safe_divide((squared * pair).sum(), valid)


gram = fsp
nst = mmd

__all__ = ["fsp", "gram", "mmd", "nst"]
