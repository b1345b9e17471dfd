r"""The log-probability of given tokens from hidden states and the output layer, never holding
``(N, V)`` logits.

.. math::

    \log p(x_n) = \frac{h_n \cdot W_{x_n} + b_{x_n}}{\tau}
                  - \log \sum_v \exp\frac{h_n \cdot W_v + b_v}{\tau}

The first term is a dot product with the chosen rows of the output layer; the log-normaliser is
computed a block of rows at a time (the fused losses' block size and GEMM,
:mod:`._blockwise`), so the extra memory is one ``(chunk_rows, V)`` block. Gradients (for the
student) are computed in the backward by recomputing each block:
:math:`\partial \log p(x_n) / \partial z_{n v} = ([v = x_n] - \operatorname{softmax}(z_n)_v) / \tau`,
then into ``hidden``, ``weight`` and ``bias`` by the same two GEMMs as the fused losses.

What a sampled-token loss needs from the teacher (:func:`~purekd.losses.sampled_reverse_kl`):
one number per sampled token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._blockwise import _linear, add_linear_gradients, default_chunk_rows, log_softmax
from ._checks import Temperature, accumulation_dtype, check_mask, check_temperature


def _block(hidden: Tensor, weight: Tensor, bias: Tensor | None, inv_tau: float,
           dtype: torch.dtype) -> Tensor:
    """One block's logits ``(C, V)`` at the temperature, in ``dtype``."""
    return _linear(hidden.to(dtype), weight.to(dtype),
                   None if bias is None else bias.to(dtype)) * inv_tau


class _TokenLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor,
                inv_tau: float, chunk_rows: int) -> Tensor:
        dtype = accumulation_dtype(hidden.dtype)
        out = torch.empty(hidden.size(0), dtype=dtype, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            log_p = log_softmax(_block(hidden[rows], weight, bias, inv_tau, dtype))
            out[rows] = log_p.gather(1, ids[rows].unsqueeze(1)).squeeze(1)
        ctx.save_for_backward(hidden, weight, bias, ids)
        ctx.options = (inv_tau, chunk_rows, dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, ids = ctx.saved_tensors
        inv_tau, chunk_rows, dtype = ctx.options
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        w = weight.to(dtype)
        grad_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if want_h else None
        grad_w = torch.zeros_like(w) if want_w else None
        grad_b = torch.zeros(weight.size(0), dtype=dtype, device=weight.device) if want_b else None
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows].to(dtype)
            p = log_softmax(_block(hidden[rows], weight, bias, inv_tau, dtype)).exp()
            g = -p
            g.scatter_add_(1, ids[rows].unsqueeze(1), torch.ones_like(g[:, :1]))
            g *= grad_out[rows].to(dtype).unsqueeze(1) * inv_tau
            add_linear_gradients(g, h, w, rows, grad_h, grad_w, grad_b)
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None or bias is None else grad_b.to(bias.dtype),
                None, None, None)


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: Temperature = 1.0,
    mask: Tensor | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    r"""``log softmax((hidden @ weight.T + bias) / temperature)[..., ids]`` without the logits.

    ``hidden`` ``(*rows, H)``, ``weight`` ``(V, H)``, ``bias`` ``(V,)`` or ``None``, ``ids``
    ``(*rows)`` integer in ``[0, V)``; ``mask`` ``(*rows)`` 0/1: only the rows with mask 1 go
    through the output layer (the others are 0 in the result, with no gradient) — selecting
    them is data-dependent, so this function is meant for eager code (it does not compile
    without a graph break). ``temperature``: a number > 0. ``chunk_rows``: rows per block
    (default: the fused losses' block size). Returns ``(*rows)`` in float32 at least (float64
    stays float64), differentiable in ``hidden``, ``weight`` and ``bias``.
    """
    where = "token_logprobs"
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.size(-1) != weight.size(1):
        raise ValueError(f"{where}: hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)} must be (*rows, H) and (V, H)")
    rows_shape = tuple(hidden.shape[:-1])
    if tuple(ids.shape) != rows_shape:
        raise ValueError(f"{where}: ids of shape {tuple(ids.shape)} must have the rows' shape "
                         f"{rows_shape}")
    if ids.is_floating_point():
        raise TypeError(f"{where}: ids must be integer token ids, got {ids.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.size(0),):
        raise ValueError(f"{where}: bias of shape {tuple(bias.shape)} must be "
                         f"({weight.size(0)},)")
    check_mask(mask, rows_shape, where)
    check_temperature(temperature, rows_shape, where)
    if isinstance(temperature, Tensor):
        raise TypeError(f"{where}: temperature must be a number here, got a tensor")
    flat_ids = ids.reshape(-1).long()
    vocabulary = weight.size(0)
    if flat_ids.numel() and not torch.compiler.is_compiling():
        low, high = int(flat_ids.min()), int(flat_ids.max())
        if low < 0 or high >= vocabulary:
            raise ValueError(f"{where}: ids must be in [0, {vocabulary}) (the output layer's "
                             f"vocabulary), got values in [{low}, {high}]")
    flat_hidden = hidden.reshape(-1, hidden.size(-1))
    dtype = accumulation_dtype(hidden.dtype)
    index = None if mask is None else (mask.reshape(-1) != 0).nonzero().squeeze(1)
    if index is not None:
        flat_hidden, flat_ids = flat_hidden.index_select(0, index), flat_ids.index_select(0, index)
    chunk = chunk_rows or default_chunk_rows(max(flat_hidden.size(0), 1), vocabulary, fused=True)
    if flat_hidden.size(0) == 0:  # nothing kept: zeros, and a zero gradient for the inputs
        kept = flat_hidden.sum(-1).to(dtype) * 0
    else:
        kept = _TokenLogprob.apply(flat_hidden, weight, bias, flat_ids, 1.0 / float(temperature),
                                   chunk)
    if index is None:
        return kept.reshape(rows_shape)
    out = kept.new_zeros(hidden.shape[:-1].numel()).index_copy(0, index, kept)
    return out.reshape(rows_shape)


__all__ = ["token_logprobs"]
