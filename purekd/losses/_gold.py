r"""``aligned_gold``: TRL's GOLD loss — matched token strings as distributions, the rest as ULD.

GOLD (TRL's ``GOLDTrainer``, ``uld_use_hybrid_loss``) splits each vocabulary in two with a
:class:`VocabularyMap`: the ``M`` token strings both tokenizers have (matched, one student id
for one teacher id) and the rest. On each aligned span's merged vectors (:mod:`._spans`):

.. math::

    \operatorname{GOLD}(q^S, q^T) = w_m\, D\bigl(q^S_{[\mathcal M_S]}, q^T_{[\mathcal M_T]}\bigr)
    + w_u\, \operatorname{ULD}\bigl(q^S_{[\bar{\mathcal M}_S]}, q^T_{[\bar{\mathcal M}_T]}\bigr)

— ``D`` a divergence by name (``"jsd"`` with ``beta=0.5`` by default, as TRL's ``beta``)
on the matched columns, paired id by id, taken as they are (not renormalised: the
matched share of each side's mass is part of what is compared, and TRL does the same); ULD
(:func:`~purekd.losses.sorted_l1`) on the unmatched columns, which share no ids. The weights:
by default TRL's, :math:`w_m = M / V_T`, :math:`w_u = 1 - w_m` (the matched share of the
teacher's vocabulary, ``V_T`` the teacher logits' width); or both given. Token-normalised over
the aligned spans (``reduction="mean"``: the sum over spans divided by their count; TRL
averages per sequence first, then over the batch).

With one tokenizer on both sides every token matches (``M = V``, :math:`w_u = 0`) and every
span is one token, so GOLD is exactly ``D`` on the rows: ``aligned_gold(..., loss="jsd")`` equals
:func:`~purekd.losses.jsd` row for row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._divergences import resolve as _resolve
from ._spans import AlignedSpans, span_loss
from ._uld import check_top_k, sorted_l1


class VocabularyMap(NamedTuple):
    """The token strings the student's and the teacher's vocabularies share.

    ``matched_S`` ``(M,)``, ``matched_T`` ``(M,)`` int64: student id ``matched_S[i]`` and
    teacher id ``matched_T[i]`` are the same (normalised) token string; each id at most once.
    ``fingerprint``: a digest of both vocabularies (what the map was built from).
    Build one with :func:`purekd.stages.vocabulary_map`.
    """

    matched_S: Tensor
    matched_T: Tensor
    fingerprint: str = ""


class _WithGradient(torch.autograd.Function):
    """A built-in divergence's per-row value with its closed-form gradient for ``log_p_S``
    (guarded where a probability is 0, which autograd through ``0 * log 0`` is not)."""

    @staticmethod
    def forward(rows: Callable[..., Any], log_p_S: Tensor, log_p_T: Tensor
                ) -> tuple[Tensor, Tensor]:
        value, a_S, _ = rows(log_p_S, log_p_T, True, False)
        return value, a_S

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_a: Tensor) -> tuple[Tensor | None, ...]:
        (a_S,) = ctx.saved_tensors
        return None, grad.unsqueeze(-1) * a_S, None


def divergence_rows(name: str, where: str, **params: float) -> Callable[[Tensor, Tensor], Tensor]:
    """``(log_p_S (C, K), log_p_T (C, K)) -> (C,)``: the divergence called ``name`` per row,
    its parameters validated (``ValueError`` naming the bad one)."""
    chosen = _resolve(name, where, **params)

    def rows(log_p_S: Tensor, log_p_T: Tensor) -> Tensor:
        value: Tensor = _WithGradient.apply(chosen.rows, log_p_S, log_p_T)[0]
        return value

    return rows


def _is_matched(matched: Tensor, vocabulary: int) -> Tensor:
    """``(V,)`` bool: True at the matched ids (no data-dependent shape, unlike ``nonzero``)."""
    flags = torch.zeros(vocabulary, dtype=torch.bool, device=matched.device)
    return flags.index_fill(0, matched, True)


def check_vocabulary_map(vocabulary_map: VocabularyMap, vocab_S: int, vocab_T: int,
                         where: str) -> None:
    if not isinstance(vocabulary_map, VocabularyMap):
        raise TypeError(f"{where}: vocabulary_map must be a VocabularyMap (from "
                        f"purekd.stages.vocabulary_map), got {type(vocabulary_map).__name__}")
    m_S, m_T = vocabulary_map.matched_S, vocabulary_map.matched_T
    if m_S.dim() != 1 or tuple(m_S.shape) != tuple(m_T.shape):
        raise ValueError(f"{where}: vocabulary_map.matched_S {tuple(m_S.shape)} and matched_T "
                         f"{tuple(m_T.shape)} must be 1-d of one length")
    if torch.compiler.is_compiling():
        return  # the value checks below read tensors: eager only
    for side, ids, size in (("S", m_S, vocab_S), ("T", m_T, vocab_T)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
            raise ValueError(f"{where}: vocabulary_map.matched_{side} holds an id outside "
                             f"[0, {size}), the width of logits_{side}: the map was built for "
                             f"other tokenizers")
        if ids.unique().numel() != ids.numel():
            raise ValueError(f"{where}: vocabulary_map.matched_{side} repeats an id; each id "
                             f"must be matched at most once")


def gold_weights(vocabulary_map: VocabularyMap, vocab_T: int, matched_weight: float | None,
                 unmatched_weight: float | None, where: str) -> tuple[float, float]:
    """``(w_m, w_u)``: both given (numbers >= 0), or TRL's ``M / V_T`` and its complement."""
    if (matched_weight is None) != (unmatched_weight is None):
        raise ValueError(f"{where}: matched_weight={matched_weight!r} and unmatched_weight="
                         f"{unmatched_weight!r}: give both (numbers >= 0) or neither (TRL's "
                         f"matched share M / V_T and 1 - M / V_T)")
    if matched_weight is None or unmatched_weight is None:
        w_m = vocabulary_map.matched_T.numel() / vocab_T
        return w_m, 1.0 - w_m
    for field, value in (("matched_weight", matched_weight),
                         ("unmatched_weight", unmatched_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{where}: {field}={value!r} must be a number >= 0")
    return float(matched_weight), float(unmatched_weight)


def gold_per_span(vocabulary_map: VocabularyMap, vocab_S: int, vocab_T: int,
                  device_S: torch.device, device_T: torch.device, *, loss: str, w_m: float,
                  w_u: float, top_k: int | None, where: str,
                  **loss_params: float) -> Callable[[Tensor, Tensor], Tensor]:
    """``(log_q_S (C, V_S), log_q_T (C, V_T)) -> (C,)``: GOLD of each span's merged vectors
    (module docstring), the divergence's parameters validated."""
    matched_rows = divergence_rows(loss, where, **loss_params)
    m_S, m_T = vocabulary_map.matched_S.to(device_S), vocabulary_map.matched_T.to(device_T)
    # the unmatched columns as the full vectors with the matched ones at probability 0: they
    # sort after every unmatched entry, so the sorted L1 (zero-padded) is that of the
    # unmatched columns alone, with no data-dependent shape
    in_S, in_T = _is_matched(m_S, vocab_S), _is_matched(m_T, vocab_T)

    def per_span(log_q_S: Tensor, log_q_T: Tensor) -> Tensor:
        matched = matched_rows(log_q_S.index_select(-1, m_S), log_q_T.index_select(-1, m_T))
        if w_u == 0:
            return w_m * matched
        rest = sorted_l1(torch.where(in_S, float("-inf"), log_q_S),
                         torch.where(in_T, float("-inf"), log_q_T), top_k)
        return w_m * matched + w_u * rest

    return per_span


def aligned_gold(logits_S: Tensor, logits_T: Tensor, spans: AlignedSpans,
         vocabulary_map: VocabularyMap, *, loss: str = "jsd", temperature: float = 1.0,
         matched_weight: float | None = None, unmatched_weight: float | None = None,
         top_k: int | None = None, reduction: str = "mean", chunk_spans: int | None = None,
         blockwise: bool = True, **loss_params: float) -> Tensor:
    r"""GOLD over the aligned spans (module docstring): :math:`\frac{1}{\sum_s w_s}\sum_s w_s
    \operatorname{GOLD}(q^S_s, q^T_s)`.

    ``logits_S`` ``(..., V_S)``, ``logits_T`` ``(..., V_T)``; ``spans``: :class:`AlignedSpans`
    over their flattened rows; ``vocabulary_map``: the matched ids. ``loss`` and
    ``**loss_params``: the divergence on the matched columns (``beta`` for ``"jsd"``, default
    0.5). ``matched_weight`` / ``unmatched_weight``: both ``None`` (TRL's matched share
    ``M / V_T`` and its complement) or both numbers >= 0. ``top_k``: the ULD part sorts only
    each side's ``k`` largest unmatched probabilities. ``chunk_spans``, ``blockwise``,
    ``reduction`` as for :func:`~purekd.losses.aligned_uld`. Gradients flow into ``logits_S`` only.
    """
    where = "aligned_gold"
    check_top_k(top_k, where)
    vocab_S, vocab_T = logits_S.size(-1), logits_T.size(-1)
    check_vocabulary_map(vocabulary_map, vocab_S, vocab_T, where)
    w_m, w_u = gold_weights(vocabulary_map, vocab_T, matched_weight, unmatched_weight, where)
    per_span = gold_per_span(vocabulary_map, vocab_S, vocab_T, logits_S.device, logits_T.device,
                             loss=loss, w_m=w_m, w_u=w_u, top_k=top_k, where=where,
                             **loss_params)
    return span_loss(per_span, logits_S, logits_T, spans, temperature=temperature,
                     reduction=reduction, chunk_spans=chunk_spans, blockwise=blockwise,
                     where=where)


__all__ = ["VocabularyMap", "aligned_gold", "divergence_rows", "gold_per_span", "gold_weights"]
