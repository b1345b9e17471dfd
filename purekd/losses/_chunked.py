"""Soft cross-entropy for large vocabularies, computed in row chunks.

:func:`kd_ce` materialises the teacher's softmax and the student's log-softmax over the whole
``(rows, vocabulary)`` matrix, and autograd keeps both for the backward pass. For token-level
distillation of language models (thousands of tokens x tens of thousands of classes) that is
several gigabytes. :func:`kd_ce_chunked` computes the same value one block of rows at a time
and recomputes each block's softmaxes in the backward pass, so the only full-size tensor it
creates is the gradient itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from purekd._compiling import compiled
from purekd._masked import safe_divide

DEFAULT_CHUNK_ROWS = 256


def _loss_block(s: Tensor, t: Tensor, inv_tau: Tensor,
                weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``sum_r w_r (lse(s_r/tau_r) - sum_c softmax(t_r/tau_r)_c s_rc/tau_r)`` for a block, and
    the per-row log-sum-exps of both sides (kept for the backward pass)."""
    scaled_s = s * inv_tau
    scaled_t = t * inv_tau
    max_s = scaled_s.amax(dim=-1, keepdim=True)
    lse_s = max_s + torch.log(torch.exp(scaled_s - max_s).sum(dim=-1, keepdim=True))
    # one exponential of the teacher's logits serves both its normaliser and the expectation
    max_t = scaled_t.amax(dim=-1, keepdim=True)
    unnormalised_t = torch.exp(scaled_t - max_t)
    normaliser_t = unnormalised_t.sum(dim=-1, keepdim=True)
    expected_s = (unnormalised_t * scaled_s).sum(dim=-1, keepdim=True) / normaliser_t
    lse_t = max_t + torch.log(normaliser_t)
    per_row = (lse_s - expected_s).to(weights.dtype).squeeze(-1)
    return (torch.where(weights != 0, per_row, 0.0) * weights).sum(), lse_s, lse_t


def _student_grad_block(s: Tensor, t: Tensor, inv_tau: Tensor, lse_s: Tensor, lse_t: Tensor,
                        row_scale: Tensor) -> Tensor:
    """``(softmax(s/tau) - softmax(t/tau)) * row_scale`` for a block (0 in rows of scale 0),
    from the saved log-sum-exps: one pass, no reduction."""
    grad = (torch.exp(s * inv_tau - lse_s) - torch.exp(t * inv_tau - lse_t)) * row_scale
    return torch.where(row_scale != 0, grad, 0.0)


def _teacher_grad_block(s: Tensor, t: Tensor, inv_tau: Tensor, lse_s: Tensor, lse_t: Tensor,
                        row_scale: Tensor) -> Tensor:
    """``-p (log q - sum_c p log q) * row_scale``: the gradient for teacher logits that need one."""
    log_q = s * inv_tau - lse_s
    p_t = torch.exp(t * inv_tau - lse_t)
    grad = -p_t * (log_q - (p_t * log_q).sum(dim=-1, keepdim=True)) * row_scale
    return torch.where(row_scale != 0, grad, 0.0)


# Each block kernel reads its inputs once when compiled (inductor fuses the softmaxes); they
# run eagerly where compilation is unavailable. dynamic=False: one kernel per block shape.
_loss_kernel = compiled(_loss_block, dynamic=False)
_student_grad_kernel = compiled(_student_grad_block, dynamic=False)
_teacher_grad_kernel = compiled(_teacher_grad_block, dynamic=False)


def _kernels(fast: bool) -> tuple[Any, Any, Any]:
    if fast and not torch.compiler.is_compiling():
        return _loss_kernel, _student_grad_kernel, _teacher_grad_kernel
    return _loss_block, _student_grad_block, _teacher_grad_block


class _ChunkedSoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits_S: Tensor, logits_T: Tensor, inv_tau: Tensor, weights: Tensor,
                chunk_rows: int, fast: bool) -> Tensor:
        loss_block = _kernels(fast)[0]
        total = weights.new_zeros(())
        lse_S, lse_T = [], []
        for start in range(0, logits_S.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            block_total, lse_s, lse_t = loss_block(logits_S[rows], logits_T[rows], inv_tau[rows],
                                                   weights[rows])
            total = total + block_total
            lse_S.append(lse_s)
            lse_T.append(lse_t)
        denominator = weights.sum()
        ctx.save_for_backward(logits_S, logits_T, inv_tau, weights, denominator,
                              torch.cat(lse_S), torch.cat(lse_T))
        ctx.chunk_rows, ctx.fast = chunk_rows, fast
        return safe_divide(total, denominator).to(logits_S.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        logits_S, logits_T, inv_tau, weights, denominator, lse_S, lse_T = ctx.saved_tensors
        _, student_block, teacher_block = _kernels(ctx.fast)
        scale = safe_divide(grad_output.to(denominator.dtype), denominator)
        grad_S = torch.empty_like(logits_S) if ctx.needs_input_grad[0] else None
        grad_T = torch.empty_like(logits_T) if ctx.needs_input_grad[1] else None
        for start in range(0, logits_S.size(0), ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            row_scale = (weights[rows] * scale).unsqueeze(-1).to(logits_S.dtype) * inv_tau[rows]
            block = (logits_S[rows], logits_T[rows], inv_tau[rows], lse_S[rows], lse_T[rows],
                     row_scale)
            if grad_S is not None:
                grad_S[rows] = student_block(*block)
            if grad_T is not None:
                grad_T[rows] = teacher_block(*block)
        return grad_S, grad_T, None, None, None, None


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
    inv_tau = (1.0 / tau).expand(logits_S.shape[:-1]).reshape(rows, 1)
    # reduce in float32 at least (float64 for float64 logits), whatever the logits' precision
    accumulate = torch.promote_types(logits_S.dtype, torch.float32)
    weights = (torch.ones(rows, dtype=accumulate, device=logits_S.device) if mask is None
               else mask.detach().reshape(rows).to(device=logits_S.device, dtype=accumulate))
    result: Tensor = _ChunkedSoftCrossEntropy.apply(flat_S, flat_T, inv_tau, weights, chunk_rows,
                                                           compile_blocks)
    return result


__all__ = ["DEFAULT_CHUNK_ROWS", "kd_ce_chunked"]
