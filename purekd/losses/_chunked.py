"""Soft cross-entropy for large vocabularies, computed in row chunks.

:func:`kd_ce` materialises the teacher's softmax and the student's log-softmax over the whole
``(rows, vocabulary)`` matrix, and autograd keeps both for the backward pass. For token-level
distillation of language models (thousands of tokens x tens of thousands of classes) that is
several gigabytes. :func:`kd_ce_chunked` computes the same value one block of rows at a time
and recomputes each block's softmaxes in the backward pass, so the only full-size tensor it
creates is the gradient itself. It is the ``soft_cross_entropy`` row function of
:mod:`._divergences` run by the block machinery of :mod:`._blockwise`, which every token-level
divergence shares.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._blockwise import DenseTarget, blockwise_on_logits
from ._divergences import resolve

DEFAULT_CHUNK_ROWS = 256


def kd_ce_chunked(
    logits_S: Tensor,
    logits_T: Tensor,
    temperature: float | Tensor = 1.0,
    mask: Tensor | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    compile_blocks: bool = True,
) -> Tensor:
    r""":func:`kd_ce`'s value and gradients, computed ``chunk_rows`` rows at a time.

    .. math::

        \mathcal{L} = \frac{\sum_r m_r\big(\operatorname{lse}(z^S_r/\tau_r)
                      - \sum_c p^T_{rc}\, z^S_{rc}/\tau_r\big)}{\sum_r m_r},
        \qquad p^T_r = \operatorname{softmax}(z^T_r/\tau_r)

    which equals :math:`\operatorname{mean}_r(-\sum_c p^T_{rc}\log\operatorname{softmax}(z^S_r/\tau_r)_c)`.
    Shapes as :func:`kd_ce`: logits ``(*rows, C)``, ``temperature`` a float or ``rows``-shaped,
    ``mask`` ``rows``-shaped. Peak extra memory is one gradient plus a few ``(chunk_rows, C)``
    blocks, instead of several ``(rows, C)`` intermediates; the backward pass recomputes the
    softmaxes. The temperature carries no gradient. ``compile_blocks`` runs each block through a
    ``torch.compile``-d kernel (compiled once per block shape; eager where unavailable).
    """
    if logits_S.shape != logits_T.shape:
        raise ValueError(f"kd_ce_chunked: student logits {tuple(logits_S.shape)} and teacher "
                         f"logits {tuple(logits_T.shape)} differ")
    if chunk_rows < 1:
        raise ValueError(f"kd_ce_chunked: chunk_rows={chunk_rows} must be >= 1")
    classes = logits_S.size(-1)
    flat_S = logits_S.reshape(-1, classes)
    flat_T = logits_T.reshape(-1, classes)
    rows = flat_S.size(0)
    tau = torch.as_tensor(temperature, dtype=logits_S.dtype, device=logits_S.device).detach()
    # reduce in float32 at least (float64 for float64 logits), whatever the logits' precision
    accumulate = torch.promote_types(logits_S.dtype, torch.float32)
    inv_tau = (1.0 / tau).to(accumulate).expand(logits_S.shape[:-1]).reshape(rows, 1)
    weights = (torch.ones(rows, dtype=accumulate, device=logits_S.device) if mask is None
               else mask.detach().reshape(rows).to(device=logits_S.device, dtype=accumulate))
    target = DenseTarget(resolve("soft_cross_entropy", "kd_ce_chunked"))
    result = blockwise_on_logits(target, flat_S, (flat_T,), inv_tau, weights,
                                 chunk_rows=chunk_rows, sum_reduction=False,
                                 compile_blocks=compile_blocks)
    return result.to(logits_S.dtype)


__all__ = ["DEFAULT_CHUNK_ROWS", "kd_ce_chunked"]
