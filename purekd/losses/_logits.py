"""Knowledge-distillation losses on logits: soft cross-entropy and MSE at a temperature.

Shapes: ``logits`` are ``(*rows, C)`` — ``(B, C)`` for sequence classification, ``(B, L, C)``
for token classification. ``temperature`` is a float or a tensor of shape ``rows`` (one
temperature per row, as produced by the ``flsw`` / ``cwsm`` schedules). ``mask`` is an
optional 0/1 tensor of shape ``rows``; masked rows take no part in the loss, as if they had been
removed with TextBrewer's ``logits_mask`` selection.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from purekd._masked import as_weights, weighted_mean, zero_masked_rows

from ._checks import check_logits_rank, check_mask_values
from ._chunked import kd_ce_chunked

Temperature = float | Tensor

CHUNKED_KD_MIN_ELEMENTS = 1 << 24
"""From this many logits on (64 MiB in float32), :func:`kd_ce` computes in row chunks."""


def _scale(logits: Tensor, temperature: Temperature) -> Tensor:
    if isinstance(temperature, Tensor) and temperature.dim() > 0:
        temperature = temperature.unsqueeze(-1)
    return logits / temperature


def kd_ce(
    logits_S: Tensor, logits_T: Tensor, temperature: Temperature = 1.0, mask: Tensor | None = None
) -> Tensor:
    r"""Soft cross-entropy of the student against the teacher at temperature :math:`\tau`.

    .. math::

        \mathcal{L} = \operatorname{mean}_{r}\Big(-\sum_c \operatorname{softmax}(z^T_r/\tau)_c
                      \,\log\operatorname{softmax}(z^S_r/\tau)_c\Big)

    the mean taken over the rows ``r`` (all leading dimensions), or over the rows where
    ``mask == 1``. No :math:`\tau^2` factor, as in TextBrewer.

    From :data:`CHUNKED_KD_MIN_ELEMENTS` logits on (token-level KD over a large vocabulary) the
    same value is computed by :func:`~purekd.losses.kd_ce_chunked`, which never holds both full
    softmaxes; the temperature then carries no gradient.
    """
    check_logits_rank(logits_S, "kd_ce", "logits_S")
    check_mask_values(mask, "kd_ce")
    if logits_S.numel() >= CHUNKED_KD_MIN_ELEMENTS:
        return kd_ce_chunked(logits_S, logits_T, temperature, mask)
    if mask is not None:
        logits_S, logits_T = zero_masked_rows(logits_S, mask), zero_masked_rows(logits_T, mask)
    p_T = F.softmax(_scale(logits_T, temperature), dim=-1)
    log_p_S = F.log_softmax(_scale(logits_S, temperature), dim=-1)
    per_row = -(p_T * log_p_S).sum(dim=-1)
    if mask is None:
        return per_row.mean()
    return weighted_mean(per_row, as_weights(mask, per_row))


def kd_mse(
    logits_S: Tensor, logits_T: Tensor, temperature: Temperature = 1.0, mask: Tensor | None = None
) -> Tensor:
    r"""Mean squared error between temperature-scaled logits.

    .. math::

        \mathcal{L} = \operatorname{mean}_{r,c}\big((z^S_{rc} - z^T_{rc})/\tau\big)^2

    over all rows and classes, or over the classes of the rows where ``mask == 1``.
    """
    check_mask_values(mask, "kd_mse")
    if mask is not None:
        logits_S, logits_T = zero_masked_rows(logits_S, mask), zero_masked_rows(logits_T, mask)
    squared = (_scale(logits_S, temperature) - _scale(logits_T, temperature)).pow(2)
    if mask is None:
        return squared.mean()
    return weighted_mean(squared, as_weights(mask, squared).unsqueeze(-1))


__all__ = ["kd_ce", "kd_mse"]
