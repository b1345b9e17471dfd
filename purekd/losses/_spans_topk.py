r"""ULD and GOLD over aligned spans from a **top-k teacher** (a cross-tokenizer teacher cache).

A cross-tokenizer teacher cache stores, per row ``r`` of the teacher's own tokenisation, its
``k`` most likely next tokens ``ids`` ``(N_T, k)`` with their log-probabilities ``logprobs``
``(N_T, k)`` (log-softmax at temperature 1, descending), and ``next_logprobs`` ``(N_T,)``: the
log-probability of the token that actually follows in the teacher's sequence,
:math:`\log p_r(x_{r+1})` — exact, whatever ``k``. That is what the observed merge
(:mod:`._spans`) needs from the teacher: a span covering the teacher tokens
:math:`x_1 \dots x_m` (predicted by rows :math:`r_1 \dots r_m`, ``shift=1``) gets

.. math::

    \log q^T_v = \log p_{r_1}(v) + \sum_{j=2}^{m} \log p_{r_j}(x_j)

known exactly on the ``k`` stored ids of row :math:`r_1` (its **head**), with the rest of the
row's mass, :math:`1 - \sum_{i \le k} p_{r_1}(i)`, times the same product as its **tail**. Only
temperature 1: the tail cannot be re-tempered.

**ULD** (:func:`aligned_uld_topk`) uses the sorted head and the tail *in total*, with no
assumption about how the tail is spread:

.. math::

    \sum_{i=1}^{h} \bigl| q^S_{(i)} - q^T_{(i)} \bigr|
    + \Bigl| \sum_{i>h} q^S_{(i)} - \sum_{i>h} q^T_{(i)} \Bigr|, \qquad h = \min(k, \text{top\_k})

— exactly the live :func:`~purekd.losses.aligned_uld` with ``top_k=h`` (the same lower bound
of the full ULD), and the full ULD itself when ``k = V_T``.

**GOLD** (:func:`aligned_gold_topk`) needs the teacher at the matched ids, most of which are
outside the head. Two conventions (``tail=``):

* ``"total"`` (the default): **the matched head only**. Of the head's ``k`` ids, those whose
  token string is matched (:math:`H_m \subseteq \mathcal M_T`, mapped to the student's ids
  :math:`\sigma(H_m)`) are compared by the divergence; everything else — the unmatched head
  entries and the tail, known only in total — goes to the ULD part, the tail in total as in
  ULD above:

  .. math::

      w_m\, D\bigl(q^S_{[\sigma(H_m)]}, q^T_{[H_m]}\bigr)
      + w_u\, \operatorname{ULD}_{h'}\bigl(q^S_{[\overline{\sigma(H_m)}]},
      q^T_{[\overline{H_m}]}\bigr), \qquad h' = \min(u, h)

  where :math:`u` is the count of unmatched head entries (the teacher's known top of its
  :math:`\overline{H_m}` part: every tail entry is below every head entry) and
  :math:`\operatorname{ULD}_{h'}` the sorted L1 of the first :math:`h'` entries plus the
  difference of the remaining masses (a lower bound of the ULD of those two vectors). This is
  GOLD with the matched set of each span cut to its teacher head's matched strings; nothing is
  ``V_T`` wide (a block holds ``(spans, V_S)`` and ``(spans, k)``). At ``k = V_T``,
  :math:`H_m = \mathcal M_T` and the tail is empty: exactly the dense GOLD. Below, the matched
  strings outside the head move from ``D`` to the ULD part (their mass is in the tail).
  ``D`` must give 0 to a column where both sides hold probability 0 (``-inf`` log-probability,
  the unmatched head positions): every built-in divergence does (``0 log 0 = 0``).
* ``"uniform"``: the teacher's row **completed with a uniform tail** — the tail mass spread
  evenly over the :math:`V_T - k` ids outside the head — and GOLD computed on the completed
  vector exactly as :func:`~purekd.losses.aligned_gold` does on dense logits (a block holds
  ``(spans, V_T)``). Every entry stays finite and positive, the total mass is the teacher's,
  and at ``k = V_T`` nothing is completed: the value is the dense GOLD. For ``k < V_T`` the
  uniform tail is the maximum-entropy guess given the mass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ._gold import (
    VocabularyMap,
    check_vocabulary_map,
    divergence_rows,
    gold_per_span,
    gold_weights,
)
from ._gold_parameters import TOPK_TAILS, check_tail
from ._spans import (
    AlignedSpans,
    TeacherMerge,
    accumulation_dtype,
    check_reduction_and_temperature,
    check_spans,
    spans_loss_from,
)
from ._uld import check_top_k


class TopkSpanTeacher(NamedTuple):
    """A teacher given by its top-k per row of its own tokenisation (module docstring).

    ``ids`` ``(*rows_T, k)`` int64 and ``logprobs`` ``(*rows_T, k)`` (log-softmax at
    temperature 1, most likely first); ``next_logprobs`` ``rows_T``: the log-probability of the
    token following row ``r`` in the teacher's sequence; ``vocab_size``: the teacher's vocabulary
    (its logits' width, ``V_T``). The spans' ``rows_T`` index the flattened rows.
    """

    ids: Tensor
    logprobs: Tensor
    next_logprobs: Tensor
    vocab_size: int


class TopkSpanTarget(NamedTuple):
    """The teacher's merged vectors of a block of ``C`` spans: ``ids`` ``(C, k)``, their merged
    log-values ``log_head`` ``(C, k)``, and the log of the merged tail mass ``log_tail``
    ``(C,)``."""

    ids: Tensor
    log_head: Tensor
    log_tail: Tensor


def topk_teacher_merge(ids: Tensor, logprobs: Tensor, next_logprobs: Tensor) -> TeacherMerge:
    """The teacher's :data:`~purekd.losses._spans.TeacherMerge` from its top-k rows: ``ids``,
    ``logprobs`` ``(N_T, k)``, ``next_logprobs`` ``(N_T,)``."""

    def merge(rows: Tensor, tokens: Tensor, mask: Tensor, inv_tau: float,
              dtype: torch.dtype) -> TopkSpanTarget:
        del tokens, inv_tau  # the later tokens' probabilities are stored; temperature 1
        count, length = rows.shape
        first = rows[:, 0]
        head = logprobs.index_select(0, first).to(dtype)
        lse = torch.logsumexp(head, dim=-1).clamp_max(0.0)
        log_tail = torch.log(-torch.expm1(lse))  # log(1 - head mass); -inf when k = V
        if length > 1:
            later = next_logprobs.index_select(0, rows[:, 1:].reshape(-1)).view(count, -1)
            product = torch.where(mask[:, 1:], later.to(dtype), 0.0).sum(-1)
            head, log_tail = head + product[:, None], log_tail + product
        return TopkSpanTarget(ids.index_select(0, first), head, log_tail)

    return merge


def sorted_l1_topk(log_q_S: Tensor, target: TopkSpanTarget, top_k: int | None = None) -> Tensor:
    """ULD of each span against a top-k teacher: the sorted heads of ``h = min(k, top_k)``
    entries and the tails in total (module docstring). Returns ``(C,)``."""
    k = target.log_head.size(-1)
    h = k if top_k is None else min(top_k, k)
    q_S = log_q_S.exp()
    head_T = target.log_head.exp().sort(dim=-1, descending=True).values
    t = head_T[:, :h]
    tail_T = target.log_tail.exp() + head_T[:, h:].sum(-1)
    s = q_S.topk(min(h, q_S.size(-1)), dim=-1).values
    m = min(s.size(-1), t.size(-1))
    value = (s[:, :m] - t[:, :m]).abs().sum(-1) + s[:, m:].sum(-1) + t[:, m:].sum(-1)
    return value + ((q_S.sum(-1) - s.sum(-1)) - tail_T).abs()


def sorted_l1_known(log_q_S: Tensor, log_head_T: Tensor, known_T: Tensor, log_tail_T: Tensor,
                    top_k: int | None = None) -> Tensor:
    r"""The sorted L1 of each span's two vectors when the teacher's is known only on part of
    its head: ``log_q_S`` ``(C, V_S)`` (``-inf`` where the student's vector has no entry),
    ``log_head_T`` ``(C, k)`` with ``known_T`` ``(C, k)`` bool (the entries that belong to the
    teacher's vector; the rest are not part of it), ``log_tail_T`` ``(C,)`` the log of the
    teacher's remaining mass (its entries unknown, each below every known one).

    :math:`\sum_{i \le h'} |s_{(i)} - t_{(i)}| + |(\sum s - \sum_{i \le h'} s_{(i)}) -
    (\sum t - \sum_{i \le h'} t_{(i)})|` with :math:`h' = \min(u, h)` per span, :math:`u` the
    known entries, :math:`h = \min(k, \text{top\_k})`: a lower bound of the full sorted L1,
    equal to it when nothing is in the tail and :math:`h \ge u`. Returns ``(C,)``."""
    k = log_head_T.size(-1)
    h = k if top_k is None else min(top_k, k)
    q_S = log_q_S.exp()
    head_T = torch.where(known_T, log_head_T, float("-inf")).exp()
    t = head_T.sort(dim=-1, descending=True).values[:, :h]
    s = q_S.topk(min(h, q_S.size(-1)), dim=-1).values
    if s.size(-1) < h:  # fewer student entries than compared positions: the rest are 0
        s = torch.cat([s, s.new_zeros(s.size(0), h - s.size(-1))], dim=-1)
    used = known_T.sum(-1, keepdim=True).clamp_max(h)
    valid = torch.arange(h, device=t.device) < used
    s, t = torch.where(valid, s, 0.0), torch.where(valid, t, 0.0)
    rest_S = q_S.sum(-1) - s.sum(-1)
    rest_T = head_T.sum(-1) + log_tail_T.exp() - t.sum(-1)
    return (s - t).abs().sum(-1) + (rest_S - rest_T).abs()


def matched_head_gold(vocabulary_map: VocabularyMap, vocab_S: int, device: torch.device, *,
                      loss: str, w_m: float, w_u: float, top_k: int | None, where: str,
                      **loss_params: float) -> Callable[[Tensor, TopkSpanTarget], Tensor]:
    r"""``(log_q_S (C, V_S), target) -> (C,)``: GOLD of a top-k teacher on its matched head
    (``tail="total"``, module docstring): ``D`` over the ``k`` head columns (``-inf`` on both
    sides where the teacher's id is unmatched), the ULD part over the rest
    (:func:`sorted_l1_known`). Only ``(C, V_S)`` and ``(C, k)`` tensors."""
    matched_rows = divergence_rows(loss, where, **loss_params)
    order = vocabulary_map.matched_T.to(device).argsort()
    sorted_T = vocabulary_map.matched_T.to(device)[order]
    sorted_S = vocabulary_map.matched_S.to(device)[order]
    count = int(sorted_T.numel())

    def per_span(log_q_S: Tensor, target: TopkSpanTarget) -> Tensor:
        ids = target.ids
        if count == 0:
            is_matched = torch.zeros_like(ids, dtype=torch.bool)
            ids_S = torch.zeros_like(ids)
        else:
            position = torch.searchsorted(sorted_T, ids).clamp_max(count - 1)
            is_matched = sorted_T[position] == ids
            ids_S = torch.where(is_matched, sorted_S[position], 0)
        inf = float("-inf")
        matched = matched_rows(torch.where(is_matched, log_q_S.gather(-1, ids_S), inf),
                               torch.where(is_matched, target.log_head, inf))
        if w_u == 0:
            return w_m * matched
        # the student's columns of the matched head leave its ULD vector (an extra column
        # receives the unmatched positions' writes, so no write lands on a real column)
        spare = torch.where(is_matched, ids_S, vocab_S)
        taken = torch.zeros(ids.size(0), vocab_S + 1, dtype=torch.bool, device=ids.device)
        taken = taken.scatter(-1, spare, True)[:, :vocab_S]
        rest = sorted_l1_known(torch.where(taken, inf, log_q_S), target.log_head, ~is_matched,
                               target.log_tail, top_k)
        return w_m * matched + w_u * rest

    return per_span


def completed(target: TopkSpanTarget, vocab_T: int) -> Tensor:
    """``(C, V_T)`` merged log-vectors: the head at its ids, the tail spread uniformly over the
    other ``V_T - k`` ids (``-inf`` there when ``k = V_T``)."""
    count, k = target.ids.shape
    rest = vocab_T - k
    fill = (target.log_tail - math.log(rest) if rest > 0
            else torch.full_like(target.log_tail, float("-inf")))
    full = fill[:, None].expand(count, vocab_T).contiguous()
    return full.scatter(-1, target.ids, target.log_head)


def _checked_teacher(teacher: TopkSpanTeacher, where: str) -> tuple[Tensor, Tensor, Tensor, int]:
    if not isinstance(teacher, tuple) or len(teacher) != len(TopkSpanTeacher._fields):
        raise TypeError(f"{where}: the teacher must be a TopkSpanTeacher(ids, logprobs, "
                        f"next_logprobs, vocab_size), got {type(teacher).__name__}")
    ids, logprobs, next_logprobs, vocab = teacher
    if isinstance(vocab, Tensor):
        vocab = int(vocab)
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"{where}: teacher.vocab_size={vocab!r} must be a positive int (the "
                         f"teacher's vocabulary, its logits' width)")
    if ids.dim() < 1 or tuple(ids.shape) != tuple(logprobs.shape):
        raise ValueError(f"{where}: teacher.ids {tuple(ids.shape)} and teacher.logprobs "
                         f"{tuple(logprobs.shape)} must have one shape (*rows_T, k)")
    k = ids.size(-1)
    if not 1 <= k <= vocab:
        raise ValueError(f"{where}: the teacher's k={k} must be in 1..vocab_size={vocab}")
    if tuple(next_logprobs.shape) != tuple(ids.shape[:-1]):
        raise ValueError(f"{where}: teacher.next_logprobs has shape "
                         f"{tuple(next_logprobs.shape)}, expected the rows {tuple(ids.shape[:-1])}")
    flat_ids = ids.reshape(-1, k)
    if not torch.compiler.is_compiling() and flat_ids.numel() and (
            int(flat_ids.min()) < 0 or int(flat_ids.max()) >= vocab):
        raise ValueError(f"{where}: teacher.ids holds an id outside [0, {vocab}), the teacher's "
                         f"vocabulary")
    return (flat_ids.long().detach(), logprobs.reshape(-1, k).detach(),
            next_logprobs.reshape(-1).detach(), vocab)


def _check_temperature_one(temperature: float, where: str) -> None:
    if temperature != 1:
        raise ValueError(f"{where}: temperature={temperature!r}, but a top-k teacher holds "
                         f"log-probabilities at temperature 1 and the mass outside its top-k "
                         f"cannot be re-tempered; use temperature=1.0 (or the live teacher)")


def _checked_inputs(logits_S: Tensor, teacher: TopkSpanTeacher, spans: AlignedSpans,
                    top_k: int | None, reduction: str, temperature: float,
                    where: str) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, int]]:
    """The checks both top-k span losses run first, in their order: ``top_k``, ``reduction``
    and ``temperature`` (which must be 1), the teacher, then the spans against both sides.
    Returns the student's logits as rows ``(N_S, V_S)`` and the checked teacher."""
    check_top_k(top_k, where)
    check_reduction_and_temperature(reduction, temperature, where)
    _check_temperature_one(temperature, where)
    checked = _checked_teacher(teacher, where)
    flat_S = logits_S.reshape(-1, logits_S.size(-1))
    check_spans(spans, flat_S.size(0), checked[0].size(0), flat_S.size(-1), checked[3], where)
    return flat_S, checked


def aligned_uld_topk(logits_S: Tensor, teacher: TopkSpanTeacher, spans: AlignedSpans, *,
                     temperature: float = 1.0, top_k: int | None = None,
                     reduction: str = "mean", chunk_spans: int | None = None,
                     blockwise: bool = True) -> Tensor:
    r"""ULD over the aligned spans from a top-k teacher (module docstring):
    :math:`\frac{1}{\sum_s w_s}\sum_s w_s \operatorname{ULD}_h(q^S_s, q^T_s)`.

    ``logits_S`` ``(..., V_S)``; ``teacher``: :class:`TopkSpanTeacher` of ``k`` entries a row;
    ``spans`` index the flattened rows of both (``shift=1``). Equals
    :func:`~purekd.losses.aligned_uld` ``(..., top_k=min(k, top_k))`` on the teacher's dense
    logits, and the full ULD at ``k = V_T``. ``temperature`` must be 1. Gradients flow into
    ``logits_S`` only; options as :func:`~purekd.losses.aligned_uld`.
    """
    where = "aligned_uld_topk"
    flat_S, (ids, logprobs, next_logprobs, _) = _checked_inputs(
        logits_S, teacher, spans, top_k, reduction, temperature, where)

    def per_span(log_q_S: Tensor, target: TopkSpanTarget) -> Tensor:
        return sorted_l1_topk(log_q_S, target, top_k)

    return spans_loss_from(per_span, flat_S, topk_teacher_merge(ids, logprobs, next_logprobs),
                           spans, dtype=accumulation_dtype(flat_S, logprobs),
                           rows_T=ids.size(0), width_T=ids.size(-1), temperature=temperature,
                           reduction=reduction, chunk_spans=chunk_spans, blockwise=blockwise,
                           where=where)


def aligned_gold_topk(logits_S: Tensor, teacher: TopkSpanTeacher, spans: AlignedSpans,
                      vocabulary_map: VocabularyMap, *, loss: str = "jsd",
                      temperature: float = 1.0, matched_weight: float | None = None,
                      unmatched_weight: float | None = None, top_k: int | None = None,
                      reduction: str = "mean", chunk_spans: int | None = None,
                      blockwise: bool = True, tail: str = "total",
                      **loss_params: float) -> Tensor:
    r"""GOLD over the aligned spans from a top-k teacher (module docstring): the matched ids
    through ``vocabulary_map``, the rest ULD; weights, ``loss``, ``top_k`` as in
    :func:`~purekd.losses.aligned_gold` (the default matched weight ``M / V_T`` uses
    ``teacher.vocab_size``).

    ``tail``: ``"total"`` (default) — the divergence on the teacher head's matched ids only,
    the unmatched head and the tail (in total) in the ULD part; a block holds ``(spans, V_S)``
    and ``(spans, k)``, nothing ``V_T`` wide. ``"uniform"`` — the teacher's vectors completed
    to ``V_T`` with the tail spread uniformly, then exactly the dense per-span GOLD (a block
    holds ``(spans, V_T)``). At ``k = V_T`` both equal :func:`~purekd.losses.aligned_gold` on
    the dense logits. ``temperature`` must be 1. Gradients flow into ``logits_S`` only.
    """
    where = "aligned_gold_topk"
    check_tail(tail, where)
    flat_S, (ids, logprobs, next_logprobs, vocab_T) = _checked_inputs(
        logits_S, teacher, spans, top_k, reduction, temperature, where)
    vocab_S = flat_S.size(-1)
    check_vocabulary_map(vocabulary_map, vocab_S, vocab_T, where)
    w_m, w_u = gold_weights(vocabulary_map, vocab_T, matched_weight, unmatched_weight, where)
    if tail == "total":
        per_span = matched_head_gold(vocabulary_map, vocab_S, ids.device, loss=loss, w_m=w_m,
                                     w_u=w_u, top_k=top_k, where=where, **loss_params)
        width_T = ids.size(-1)
    else:
        dense = gold_per_span(vocabulary_map, vocab_S, vocab_T, flat_S.device, ids.device,
                              loss=loss, w_m=w_m, w_u=w_u, top_k=top_k, where=where,
                              **loss_params)

        def per_span(log_q_S: Tensor, target: TopkSpanTarget) -> Tensor:
            return dense(log_q_S, completed(target, vocab_T))

        width_T = vocab_T

    return spans_loss_from(per_span, flat_S, topk_teacher_merge(ids, logprobs, next_logprobs),
                           spans, dtype=accumulation_dtype(flat_S, logprobs),
                           rows_T=ids.size(0), width_T=width_T, temperature=temperature,
                           reduction=reduction, chunk_spans=chunk_spans, blockwise=blockwise,
                           where=where)


__all__ = ["TOPK_TAILS", "TopkSpanTarget", "TopkSpanTeacher", "aligned_gold_topk",
           "aligned_uld_topk", "completed", "matched_head_gold", "sorted_l1_known",
           "sorted_l1_topk", "topk_teacher_merge"]
