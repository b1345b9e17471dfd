r"""Losses over aligned spans: a teacher and a student with different tokenizers.

When the two models tokenise the same text differently, row ``t`` of one side's logits and row
``t`` of the other's do not predict the same thing. The alignment stage
(:func:`purekd.stages.align_spans`) finds the *spans* of text where both sides' token
boundaries agree and hands them over as :class:`AlignedSpans`: for each span, the rows of each
side's logits that predict the span's tokens and the ids of those tokens.

**One distribution per span and side (the "observed" merge).** A span covering the tokens
:math:`x_1 \dots x_m` on one side gets the vector

.. math::

    \log q_v = \log p(v \mid \text{prefix}) + \sum_{j=2}^{m} \log p(x_j \mid \text{prefix},
    x_1 \dots x_{j-1}), \qquad v = 1 \dots V

— the first token's distribution times the probabilities of the span's actual later tokens (all
at the loss temperature). Its entry at the actual first token, :math:`q_{x_1}`, is the side's
joint probability of the span's text; the vector sums to :math:`\prod_{j \ge 2} p(x_j \mid
\dots) \le 1`, so a side that is unsure of how the span continues carries less mass. Both sides'
first distributions are conditioned on the *same* text (everything before the span), which is
why the first token's distribution is the one kept: TRL's alternative ("bayesian": the last
token's distribution times the earlier tokens' probabilities) conditions each side on its own
in-span tokens, which differ between the tokenizers. A single-token span is the plain
distribution (the product is empty), so with one tokenizer on both sides nothing changes.

**Blockwise.** The losses here never hold the ``(S, V)`` merged vectors of every span at once:
:func:`span_loss` computes the loss a block of spans at a time under ``no_grad`` and, in the
backward, recomputes each block with autograd and adds its gradient into the student's logits
gradient (``index_add_``). The only full-size tensor it creates is that gradient; a block holds
``chunk_spans x (L_S V_S + L_T V_T)`` values. The teacher's logits get no gradient.

Shapes: ``logits_S`` ``(..., V_S)`` and ``logits_T`` ``(..., V_T)`` are flattened to rows
``(N_S, V_S)``, ``(N_T, V_T)``; spans index those rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from purekd._masked import safe_divide

DEFAULT_BLOCK_ELEMENTS = 1 << 23
"""Logit entries per block of spans when no ``chunk_spans`` is given (32 MiB in float32)."""

SpanFunction = Callable[[Tensor, Any], Tensor]
"""``(log_q_S (C, V_S), target) -> (C,)``: a per-span loss of the merged vectors (``target``:
the teacher's, ``log_q_T`` ``(C, V_T)`` for dense logits; see :data:`TeacherMerge`)."""


class AlignedSpans(NamedTuple):
    """Spans of text where the student's and the teacher's token boundaries agree.

    ``S`` spans (of every sequence of the batch together), at most ``L_S`` student and ``L_T``
    teacher tokens each:

    - ``rows_S`` ``(S, L_S)`` int64: the rows of ``logits_S.reshape(-1, V_S)`` that predict the
      span's student tokens, in order (a causal LM's row predicting token ``t`` is ``t - 1``);
    - ``ids_S`` ``(S, L_S)`` int64: those tokens' ids;
    - ``mask_S`` ``(S, L_S)`` bool: True for the span's tokens, False for padding (padding rows
      and ids are 0);
    - ``rows_T``, ``ids_T``, ``mask_T``: the same for the teacher;
    - ``weight`` ``(S,)`` float32: 1 for a span taking part in the loss, 0 for padding (a batch
      without any aligned span has one padding span, so every shape is at least 1).
    """

    rows_S: Tensor
    ids_S: Tensor
    mask_S: Tensor
    rows_T: Tensor
    ids_T: Tensor
    mask_T: Tensor
    weight: Tensor


def check_spans(spans: AlignedSpans, rows_S: int, rows_T: int, vocab_S: int, vocab_T: int,
                where: str) -> None:
    """Raise a ``ValueError`` naming the field when ``spans`` does not fit the logits."""
    if not isinstance(spans, tuple) or len(spans) != len(AlignedSpans._fields):
        raise TypeError(f"{where}: spans must be an AlignedSpans (from purekd.stages.align_spans)"
                        f", got {type(spans).__name__}")
    spans = AlignedSpans(*spans)
    count = spans.weight.shape[0] if spans.weight.dim() == 1 else -1
    if count < 1:
        raise ValueError(f"{where}: spans.weight must have shape (spans,) with at least one "
                         f"entry, got {tuple(spans.weight.shape)}")
    for side, rows, ids, mask, n, v in (("S", spans.rows_S, spans.ids_S, spans.mask_S, rows_S,
                                         vocab_S),
                                        ("T", spans.rows_T, spans.ids_T, spans.mask_T, rows_T,
                                         vocab_T)):
        shape = tuple(rows.shape)
        if rows.dim() != 2 or shape[0] != count or shape[1] < 1:
            raise ValueError(f"{where}: spans.rows_{side} must have shape ({count}, L>=1), got "
                             f"{shape}")
        for field, value in ((f"ids_{side}", ids), (f"mask_{side}", mask)):
            if tuple(value.shape) != shape:
                raise ValueError(f"{where}: spans.{field} has shape {tuple(value.shape)}, "
                                 f"spans.rows_{side} {shape}: they must be equal")
        if torch.compiler.is_compiling():
            continue  # the value checks below read tensors: eager only
        used = rows[mask]  # padding entries hold 0 and are never read
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= n):
            raise ValueError(f"{where}: spans.rows_{side} holds a row outside [0, {n}): the "
                             f"spans were aligned for other logits (rows of logits_{side} "
                             f"flattened to ({n}, {v}))")
        used = ids[mask]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= v):
            raise ValueError(f"{where}: spans.ids_{side} holds a token id outside [0, {v}), the "
                             f"vocabulary of logits_{side}: the tokenizer and the model differ")


def accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (softmaxes and sums in float32 at least)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def merged_log_probs(logits: Tensor, rows: Tensor, ids: Tensor, mask: Tensor,
                     inv_tau: float, dtype: torch.dtype) -> Tensor:
    r"""The merged log-probability vector of each span (see the module docstring).

    ``logits`` ``(N, V)``; ``rows``, ``ids``, ``mask`` ``(C, L)``. Returns ``(C, V)``:
    :math:`\log p_{r_1} + \sum_{j \ge 2} [m_j] \log p_{r_j}(x_j)`, ``p`` the softmax at
    temperature ``1 / inv_tau``.
    """
    count, length = rows.shape
    first = torch.log_softmax(logits.index_select(0, rows[:, 0]).to(dtype) * inv_tau, dim=-1)
    if length == 1:
        return first
    # the later tokens' log-probabilities, log p(x_j) = z_j[x_j] - logsumexp(z_j): only those
    # of real positions in eager mode (most spans are one token: the padded positions of L - 1
    # columns would double the work); every position under torch.compile (static shapes)
    later_rows, later_ids, later_mask = rows[:, 1:], ids[:, 1:], mask[:, 1:]
    if torch.compiler.is_compiling():
        z = logits.index_select(0, later_rows.reshape(-1)).view(count, length - 1, -1)
        z = z.to(dtype) * inv_tau
        later = z.gather(-1, later_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
        return first + torch.where(later_mask, later, 0.0).sum(-1, keepdim=True)
    span, position = later_mask.nonzero(as_tuple=True)
    z = logits.index_select(0, later_rows[span, position]).to(dtype) * inv_tau
    later = z.gather(-1, later_ids[span, position].unsqueeze(-1)).squeeze(-1) \
        - torch.logsumexp(z, dim=-1)
    return first + first.new_zeros(count).index_add(0, span, later).unsqueeze(-1)


TeacherMerge = Callable[[Tensor, Tensor, Tensor, float, torch.dtype], Any]
"""``(rows_T (C, L_T), ids_T (C, L_T), mask_T (C, L_T), inv_tau, dtype) -> target``: the
teacher's merged vectors of a block of spans (no gradient), in the form ``per_span`` takes as
its second argument: ``log_q_T`` ``(C, V_T)`` for dense logits, a :class:`TopkSpanTarget` for a
top-k teacher (:mod:`._spans_topk`)."""


def dense_teacher(flat_T: Tensor) -> TeacherMerge:
    """The :data:`TeacherMerge` of dense teacher logits ``(N_T, V_T)``."""
    detached = flat_T.detach()

    def merge(rows: Tensor, ids: Tensor, mask: Tensor, inv_tau: float,
              dtype: torch.dtype) -> Tensor:
        return merged_log_probs(detached, rows, ids, mask, inv_tau, dtype)

    return merge


def _block_value(per_span: SpanFunction, logits_S: Tensor, merge_T: TeacherMerge,
                 spans: AlignedSpans, block: slice, inv_tau: float,
                 dtype: torch.dtype) -> Tensor:
    """``sum_s weight_s loss_s`` over one block of spans."""
    weight = spans.weight[block].to(dtype)
    with torch.no_grad():
        target = merge_T(spans.rows_T[block], spans.ids_T[block], spans.mask_T[block], inv_tau,
                         dtype)
    log_q_S = merged_log_probs(logits_S, spans.rows_S[block], spans.ids_S[block],
                               spans.mask_S[block], inv_tau, dtype)
    values = per_span(log_q_S, target)
    return torch.where(weight != 0, values, 0.0).mul(weight).sum()


class _Blockwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, per_span: SpanFunction, merge_T: TeacherMerge, dtype: torch.dtype,
                chunk: int, sum_reduction: bool, inv_tau: float, logits_S: Tensor,
                *fields: Tensor) -> Tensor:
        spans = AlignedSpans(*fields)
        total = torch.zeros((), dtype=dtype, device=logits_S.device)
        with torch.no_grad():
            for start in range(0, spans.weight.size(0), chunk):
                total = total + _block_value(per_span, logits_S, merge_T, spans,
                                             slice(start, start + chunk), inv_tau, dtype)
        weight = spans.weight.to(dtype)
        denominator = weight.new_ones(()) if sum_reduction else weight.sum()
        ctx.save_for_backward(logits_S, denominator, *fields)
        ctx.options = (per_span, merge_T, dtype, chunk, inv_tau)
        return safe_divide(total, denominator)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        logits_S, denominator, *fields = ctx.saved_tensors
        per_span, merge_T, dtype, chunk, inv_tau = ctx.options
        spans = AlignedSpans(*fields)
        grad_S = None
        if ctx.needs_input_grad[6]:
            scale = safe_divide(grad_output.to(dtype), denominator)
            grad_S = torch.zeros_like(logits_S)
            for start in range(0, spans.weight.size(0), chunk):
                block = slice(start, start + chunk)
                rows = spans.rows_S[block]
                picked = logits_S.index_select(0, rows.reshape(-1)).detach()
                # the block's rows as a (C * L, V) tensor of their own: rows[c, j] is c * L + j
                local = torch.arange(rows.numel(), device=rows.device).view(rows.shape)
                block_spans = spans._replace(rows_S=local, **{
                    f: getattr(spans, f)[block]
                    for f in ("ids_S", "mask_S", "rows_T", "ids_T", "mask_T", "weight")})

                def block_loss(z: Tensor, block_spans: AlignedSpans = block_spans) -> Tensor:
                    return _block_value(per_span, z, merge_T, block_spans, slice(None),
                                        inv_tau, dtype) * scale

                # torch.func.grad, not torch.autograd.grad: it also traces under torch.compile
                g = torch.func.grad(block_loss)(picked)
                grad_S.index_add_(0, rows.reshape(-1), g.to(grad_S.dtype))
        return (None, None, None, None, None, None, grad_S, *([None] * len(fields)))


def default_chunk_spans(spans: AlignedSpans, vocab_S: int, vocab_T: int) -> int:
    """Spans per block: :data:`DEFAULT_BLOCK_ELEMENTS` logit entries over both sides' rows."""
    per_span = spans.rows_S.size(1) * vocab_S + spans.rows_T.size(1) * vocab_T
    return max(1, DEFAULT_BLOCK_ELEMENTS // max(per_span, 1))


def check_reduction_and_temperature(reduction: str, temperature: float, where: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{where}: reduction={reduction!r}; choose 'mean' or 'sum'")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not temperature > 0:
        raise ValueError(f"{where}: temperature={temperature!r} must be a number > 0")


def span_loss(per_span: SpanFunction, logits_S: Tensor, logits_T: Tensor, spans: AlignedSpans,
              *, temperature: float, reduction: str, chunk_spans: int | None, blockwise: bool,
              where: str) -> Tensor:
    r""":math:`\frac{1}{\sum_s w_s} \sum_s w_s\, \ell(\log q^S_s, \log q^T_s)` (``"mean"``;
    ``"sum"``: without the division) over the merged vectors of the aligned spans.

    ``blockwise``: ``chunk_spans`` spans at a time (see the module docstring); ``False``: all
    spans at once with plain autograd (the dense reference, ``(S, L, V)`` tensors held).
    Every span of weight 0 → 0 with finite (zero) gradients.
    """
    check_reduction_and_temperature(reduction, temperature, where)
    vocab_S, vocab_T = logits_S.size(-1), logits_T.size(-1)
    flat_S, flat_T = logits_S.reshape(-1, vocab_S), logits_T.reshape(-1, vocab_T)
    check_spans(spans, flat_S.size(0), flat_T.size(0), vocab_S, vocab_T, where)
    return spans_loss_from(per_span, flat_S, dense_teacher(flat_T), spans,
                           dtype=accumulation_dtype(flat_S, flat_T), rows_T=flat_T.size(0),
                           width_T=vocab_T, temperature=temperature, reduction=reduction,
                           chunk_spans=chunk_spans, blockwise=blockwise, where=where)


def spans_loss_from(per_span: SpanFunction, flat_S: Tensor, merge_T: TeacherMerge,
                    spans: AlignedSpans, *, dtype: torch.dtype, rows_T: int, width_T: int,
                    temperature: float, reduction: str, chunk_spans: int | None,
                    blockwise: bool, where: str) -> Tensor:
    """:func:`span_loss` over checked spans, the teacher given as a :data:`TeacherMerge`
    (``rows_T`` rows; ``width_T`` values a teacher row takes in a block, for the default
    block size)."""
    spans = AlignedSpans(*spans)  # a plain tuple after a runner moved the batch to a device
    inv_tau = 1.0 / float(temperature)
    if flat_S.size(0) == 0 or rows_T == 0:  # no rows at all: no span either
        return flat_S.sum().to(dtype) * 0.0
    if not blockwise:
        total = _block_value(per_span, flat_S, merge_T, spans, slice(None), inv_tau, dtype)
        weight = spans.weight.to(dtype)
        return total if reduction == "sum" else safe_divide(total, weight.sum())
    if chunk_spans is None:
        chunk_spans = default_chunk_spans(spans, flat_S.size(-1), width_T)
    if isinstance(chunk_spans, bool) or not isinstance(chunk_spans, int) or chunk_spans < 1:
        raise ValueError(f"{where}: chunk_spans={chunk_spans!r} must be a positive int (or None)")
    result: Tensor = _Blockwise.apply(per_span, merge_T, dtype, chunk_spans, reduction == "sum",
                                      inv_tau, flat_S, *spans)
    return result


__all__ = ["AlignedSpans", "TeacherMerge", "dense_teacher", "merged_log_probs", "span_loss",
           "spans_loss_from"]
