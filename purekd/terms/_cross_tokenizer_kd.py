r"""The cross-tokenizer KD term: a teacher and a student with different tokenizers.

Each model reads its own tokenisation of the same text; the batch carries the
:class:`~purekd.losses.AlignedSpans` of the two tokenisations beside them
(``{'student': ..., 'teacher': ..., 'spans': ...}``, from
:class:`~purekd.stages.CrossTokenizerCollator`). :func:`~purekd.stages.batch_split` reads them and
the models stage sets them on the student's outputs (``Adapted.spans``), which is how they reach
this term. With ``S`` spans of weight :math:`w_s` (1 for a real span, 0 for padding):

.. math::

    \mathcal{L} = \frac{\sum_s w_s\, \ell(q^S_s, q^T_s)}{\sum_s w_s}

where :math:`\ell` is ULD (:func:`~purekd.losses.aligned_uld`) or GOLD
(:func:`~purekd.losses.aligned_gold`) of the span's merged distributions — or, when the teacher
is a cross-tokenizer cache (its adaptor returns ``topk_ids``, ``topk_logprobs``,
``topk_next_logprobs`` and ``topk_vocab_size`` instead of ``logits``),
:func:`~purekd.losses.aligned_uld_topk` / :func:`~purekd.losses.aligned_gold_topk`. The term's token count
(``kept_rows``) is :math:`\sum_s w_s`, the aligned spans: under
``loss_normalisation='tokens'`` the loss of several micro-batches (and processes) is the loss of
one batch holding all their spans. Shapes: ``logits`` ``(B, L_S, V_S)`` and ``(B, L_T, V_T)``
(the spans index the flattened rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from purekd import losses
from purekd.losses._gold import check_vocabulary_map
from purekd.losses._gold_parameters import check_gold_parameters
from purekd.losses._uld import check_top_k
from purekd.stages import Adapted

from ._context import Context, Term, Weight

CROSS_TOKENIZER_LOSSES = ("gold", "uld")
"""The ``kd_loss_type`` names that run over the aligned spans of a cross-tokenizer batch."""

DOCS = "docs/cross-tokenizer.md"


def spans_of(adapted_S: Adapted) -> Any:
    """The batch's :class:`~purekd.losses.AlignedSpans` (on the student's outputs), or None."""
    return adapted_S.spans


def _has_teacher(adapted_T: Adapted) -> bool:
    """The teacher gave dense ``logits`` or a top-k (a cross-tokenizer cache)."""
    return bool(adapted_T.logits) or adapted_T.topk_ids is not None


def topk_teacher(adapted_T: Adapted) -> losses.TopkSpanTeacher:
    """The teacher's top-k from a cross-tokenizer cache, as the aligned top-k losses take it."""
    assert adapted_T.topk_ids is not None and adapted_T.topk_logprobs is not None
    assert adapted_T.topk_next_logprobs is not None and adapted_T.topk_vocab_size is not None
    return losses.TopkSpanTeacher(adapted_T.topk_ids, adapted_T.topk_logprobs,
                                  adapted_T.topk_next_logprobs, adapted_T.topk_vocab_size)


def span_count(adapted_S: Adapted, adapted_T: Adapted) -> Tensor | None:
    r"""The aligned spans :math:`\sum_s w_s` of the batch, a 0-dim float32 (float64 with
    float64 logits); ``None`` without spans or logits."""
    spans = spans_of(adapted_S)
    if spans is None or not adapted_S.logits or not _has_teacher(adapted_T):
        return None
    dtype = torch.promote_types(adapted_S.logits[0].dtype, torch.float32)
    return spans.weight.sum().to(dtype)


def cross_batch_error(loss: str) -> str:
    """The message for a cross-tokenizer batch given to a one-vocabulary KD loss."""
    return (f"the batch carries 'spans' (a cross-tokenizer batch: the teacher and the student "
            f"read different tokenisations) but kd_loss_type={loss!r} compares row t of the "
            f"student with row t of the teacher over one vocabulary; use kd_loss_type='gold' "
            f"(with make_step(..., vocabulary_map=...)) or 'uld', which compare the aligned "
            f"spans (see {DOCS})")


def forbid_spans(term: Term, loss: str) -> Term:
    """``term`` (a one-vocabulary KD term) whose check raises on a cross-tokenizer batch,
    naming ``loss`` and the cross-tokenizer losses."""
    inner = term.check

    def check(adapted_S: Adapted, adapted_T: Adapted) -> None:
        if spans_of(adapted_S) is not None:
            raise ValueError(cross_batch_error(loss))
        inner(adapted_S, adapted_T)

    return term._replace(check=check)


def _check_params(loss: str, params: Mapping[str, Any]) -> dict[str, Any]:
    given = dict(params)
    if loss == "uld":
        unknown = set(given) - {"top_k"}
        if unknown:
            raise ValueError(f"cross_tokenizer_kd('uld'): unknown parameter(s) {sorted(unknown)}; "
                             "'uld' takes top_k")
        check_top_k(given.get("top_k"), "cross_tokenizer_kd('uld')")
        return given
    return check_gold_parameters(given, "cross_tokenizer_kd('gold')")


def cross_tokenizer_kd(
    loss: str = "gold",
    *,
    vocabulary_map: losses.VocabularyMap | None = None,
    temperature: float = 1.0,
    params: Mapping[str, Any] | None = None,
    chunk_spans: int | None = None,
    weight: Weight = 1.0,
    name: str = "kd_loss",
) -> Term:
    r"""A term ``{name: loss over the aligned spans}`` (module docstring), at ``temperature``.

    ``loss``: ``"gold"`` (``params``: ``loss``, its divergence's own parameters such as
    ``beta``, ``matched_weight``, ``unmatched_weight``, ``top_k``, and ``tail`` for a top-k
    teacher — :func:`~purekd.losses.aligned_gold_topk`'s; ignored with dense teacher logits,
    which have no tail; needs ``vocabulary_map``,
    :func:`~purekd.stages.vocabulary_map` of the two tokenizers) or ``"uld"`` (``params``:
    ``top_k``). Both sides' adaptors return ``logits``. The term's ``kept_rows`` is the count of
    aligned spans. Bad parameters, and ``"gold"`` without a vocabulary map, raise here.
    """
    if loss not in CROSS_TOKENIZER_LOSSES:
        raise ValueError(f"cross_tokenizer_kd: unknown loss {loss!r}; choose one of "
                         f"{list(CROSS_TOKENIZER_LOSSES)}")
    options = _check_params(loss, params or {})
    if loss == "gold":
        if vocabulary_map is None:
            raise ValueError(
                "kd_loss_type='gold' needs the vocabulary map of the two tokenizers (which "
                "token strings they share): build it with purekd.stages.vocabulary_map("
                "tokenizer_S, tokenizer_T) and pass make_step(..., vocabulary_map=...) (or the "
                f"distiller's vocabulary_map=...); or use kd_loss_type='uld', which needs none "
                f"(see {DOCS})")
        if not isinstance(vocabulary_map, losses.VocabularyMap):
            raise TypeError(f"cross_tokenizer_kd: vocabulary_map must be a "
                            f"purekd.losses.VocabularyMap (purekd.stages.vocabulary_map), got "
                            f"{type(vocabulary_map).__name__}")
    elif vocabulary_map is not None:
        raise ValueError("cross_tokenizer_kd('uld'): ULD compares sorted probabilities and uses "
                         "no vocabulary map; leave vocabulary_map out, or use 'gold'")

    def value(logits_S: Tensor, adapted_T: Adapted, spans: Any) -> Tensor:
        if not adapted_T.logits:  # a top-k teacher: a cross-tokenizer cache
            if loss == "gold":
                assert vocabulary_map is not None
                return losses.aligned_gold_topk(logits_S, topk_teacher(adapted_T), spans,
                                                vocabulary_map, temperature=temperature,
                                                chunk_spans=chunk_spans, **options)
            return losses.aligned_uld_topk(logits_S, topk_teacher(adapted_T), spans,
                                           temperature=temperature, chunk_spans=chunk_spans,
                                           **options)
        logits_T = adapted_T.logits[0]
        if loss == "gold":
            assert vocabulary_map is not None
            dense = {k: v for k, v in options.items() if k != "tail"}  # a top-k teacher's only
            return losses.aligned_gold(logits_S, logits_T, spans, vocabulary_map,
                                       temperature=temperature, chunk_spans=chunk_spans,
                                       **dense)
        return losses.aligned_uld(logits_S, logits_T, spans, temperature=temperature,
                                  chunk_spans=chunk_spans, **options)

    def term(adapted_S: Adapted, adapted_T: Adapted, ctx: Context) -> dict[str, Tensor]:
        del ctx
        spans = spans_of(adapted_S)
        if spans is None or not adapted_S.logits or not _has_teacher(adapted_T):
            return {}
        return {name: value(adapted_S.logits[0], adapted_T, spans)}

    def check(adapted_S: Adapted, adapted_T: Adapted) -> None:
        if spans_of(adapted_S) is None:
            raise ValueError(
                f"kd_loss_type={loss!r} over aligned spans needs a cross-tokenizer batch: "
                f"{{'student': ..., 'teacher': ..., 'spans': AlignedSpans}} (build it with "
                f"purekd.stages.CrossTokenizerCollator(tokenizer_S, tokenizer_T)); this batch has "
                f"no 'spans' (see {DOCS})")
        if not adapted_S.logits:
            raise ValueError(f"kd_loss_type={loss!r} on a cross-tokenizer batch compares "
                             f"logits: the student's adaptor returned no 'logits' (the fused "
                             f"form has no cross-tokenizer version)")
        if not _has_teacher(adapted_T):
            raise ValueError(f"kd_loss_type={loss!r} on a cross-tokenizer batch: the teacher's "
                             f"adaptor returned no 'logits' and no top-k of a cross-tokenizer "
                             f"cache (the fused form has no cross-tokenizer version)")
        if not adapted_T.logits:
            missing = [key for key in ("topk_next_logprobs", "topk_vocab_size")
                       if getattr(adapted_T, key) is None]
            if missing:
                raise ValueError(
                    f"kd_loss_type={loss!r} on a cross-tokenizer batch with a top-k teacher: "
                    f"the teacher's adaptor returned no {missing}; a top-k teacher across "
                    f"tokenizers comes from a cross-tokenizer cache (purekd.teacher_cache."
                    f"CrossTokenizerCachedCollate), which gives them (see {DOCS})")
        if vocabulary_map is not None:
            vocab_T = (adapted_T.logits[0].size(-1) if adapted_T.logits
                       else adapted_T.topk_vocab_size)
            assert vocab_T is not None
            check_vocabulary_map(vocabulary_map, adapted_S.logits[0].size(-1), vocab_T,
                                 f"kd_loss_type={loss!r}")

    return Term(term, weight, check, name, kept_rows=span_count)


def by_spans(one_vocabulary: Term, cross: Term) -> Term:
    """One term that is ``cross`` on a cross-tokenizer batch (spans present) and
    ``one_vocabulary`` otherwise (``kd_loss_type='uld'``: row against row with one tokenizer,
    over the aligned spans with two) — a structural choice, by whether the batch has spans."""

    def term(adapted_S: Adapted, adapted_T: Adapted, ctx: Context) -> dict[str, Tensor]:
        chosen = cross if spans_of(adapted_S) is not None else one_vocabulary
        return chosen(adapted_S, adapted_T, ctx)

    def check(adapted_S: Adapted, adapted_T: Adapted) -> None:
        chosen = cross if spans_of(adapted_S) is not None else one_vocabulary
        chosen.check(adapted_S, adapted_T)

    def count(adapted_S: Adapted, adapted_T: Adapted) -> Tensor | None:
        chosen = cross if spans_of(adapted_S) is not None else one_vocabulary
        return None if chosen.kept_rows is None else chosen.kept_rows(adapted_S, adapted_T)

    return Term(term, one_vocabulary.weight, check, one_vocabulary.name,
                (*one_vocabulary.modules, *cross.modules), kept_rows=count)


__all__ = ["CROSS_TOKENIZER_LOSSES", "by_spans", "cross_batch_error", "cross_tokenizer_kd",
           "forbid_spans", "span_count", "topk_teacher"]
