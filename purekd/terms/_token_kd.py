"""The token-level KD term: a registered divergence on logits, fused hidden states or top-k.

One small term per form of the same distillation; :func:`token_kd` builds the four once (with
the divergence's parameters validated) and each call takes the one that fits the adaptors'
outputs — by which keys they hold, a structural choice that compiles away:

============================  =====================================  ==========================
student's adaptor             teacher's adaptor                      term (loss)
============================  =====================================  ==========================
``logits``                    ``logits``                             :func:`logits_form`
                                                                     (:func:`logits_kd`)
``logits``                    ``topk_ids`` + ``topk_logprobs``       :func:`topk_form`
                                                                     (``topk_<loss>``)
``lm_hidden`` + ``lm_weight`` ``lm_hidden`` + ``lm_weight``          :func:`fused_form`
``lm_hidden`` + ``lm_weight`` ``topk_ids`` + ``topk_logprobs``       :func:`fused_form`
                                                                     (top-k teacher)
============================  =====================================  ==========================

(both fused rows call :func:`~purekd.losses.fused_linear_distill`). ``lm_bias`` goes with
``lm_weight`` when the output layer has one. The fused forms never hold ``(rows, V)`` logits.
Rows and masks follow :func:`~purekd.terms.logits_kd`: the student's ``logits_mask`` (else the
teacher's) selects rows; two different masks pair the k-th kept rows; a teacher's
``topk_mask`` (rows its cache has) further removes rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from purekd import losses, schedules
from purekd.losses._divergences import declared, parameters
from purekd.losses._topk import topk_loss
from purekd.stages import Adapted

from ._context import Context, Term, Weight
from ._logits_kd import (
    FirstBatch,
    align_teacher_rows,
    check_logits,
    check_paired_rows,
    fits,
    kept_rows,
    logits_kd,
    row_masks,
    vocabulary_mismatch,
)

SHARED_VOCAB_OPTION = ("set DistillationConfig(shared_vocab=True) (token_kd(shared_vocab=True)) "
                       "to compare on the first min(V_S, V_T) entries")


class Setup(NamedTuple):
    """What every form of one ``token_kd`` term shares, fixed when the term is built."""

    loss: str
    params: dict[str, Any]  # the divergence's parameters (without ``tail``)
    tail: bool
    temperature: float
    shared_vocab: bool
    shift_probability: bool
    ce_weight: float
    ignore_index: int
    name: str


# ----------------------------------------------------------------------- rows and masks
def _fused(adapted: Adapted) -> bool:
    return not adapted.logits and adapted.lm_hidden is not None and adapted.lm_weight is not None


def _topk(adapted: Adapted) -> bool:
    return not adapted.logits and not _fused(adapted) and adapted.topk_ids is not None


def _rows(adapted: Adapted) -> Tensor | None:
    """The tensor whose leading dimensions are the side's rows (None: no distribution)."""
    if adapted.logits:
        return adapted.logits[0]
    if _fused(adapted):
        return adapted.lm_hidden
    return adapted.topk_ids


def _as_logits(adapted: Adapted, rows: Tensor) -> Adapted:
    """``adapted`` with ``rows`` standing for its logits (for the logits' mask rules)."""
    return adapted if adapted.logits else adapted._replace(logits=(rows,))


class Kept(NamedTuple):
    """The mask of the kept rows (None: all) and the teacher with its rows aligned to them."""

    mask: Tensor | None
    teacher: Adapted


def kept(adapted_S: Adapted, adapted_T: Adapted) -> Kept:
    """The rows the term keeps: :func:`row_masks` on the first rows (the teacher's rows paired
    to the student's when each side has its own mask), times the teacher's ``topk_mask``."""
    rows_S, rows_T = _rows(adapted_S), _rows(adapted_T)
    assert rows_S is not None and rows_T is not None
    mask, mask_T = row_masks(_as_logits(adapted_S, rows_S), _as_logits(adapted_T, rows_T), 0,
                             rows_S, rows_T)
    teacher = adapted_T
    if mask is not None and mask_T is not None:
        paired_S, paired_T = mask, mask_T

        def align(t: Tensor | None) -> Tensor | None:
            return None if t is None else align_teacher_rows(t, paired_T, paired_S)

        topk_mask = adapted_T.topk_mask
        teacher = adapted_T._replace(
            lm_hidden=align(adapted_T.lm_hidden), topk_ids=align(adapted_T.topk_ids),
            topk_logprobs=align(adapted_T.topk_logprobs),
            topk_mask=None if topk_mask is None else
            align_teacher_rows(topk_mask.unsqueeze(-1), paired_T, paired_S).squeeze(-1))
    if teacher.topk_mask is not None:
        keep = teacher.topk_mask != 0
        mask = (keep if mask is None else (mask != 0) & keep).to(torch.int64)
    return Kept(mask, teacher)


def count(adapted_S: Adapted, adapted_T: Adapted) -> Tensor | None:
    """The term's kept rows (for token normalisation); None when either side has none."""
    rows_S = _rows(adapted_S)
    if rows_S is None or _rows(adapted_T) is None:
        return None
    return kept_rows(rows_S, kept(adapted_S, adapted_T).mask)


# ----------------------------------------------------------------------- the forms
def _labels(setup: Setup, adapted_S: Adapted, mask: Tensor | None) -> Tensor:
    """The student's labels, ``ignore_index`` in the rows the KD leaves out."""
    labels = adapted_S.labels[0]
    return labels if mask is None else torch.where(mask != 0, labels, setup.ignore_index)


def _plus_text(setup: Setup, value: Tensor, adapted_S: Adapted, mask: Tensor | None) -> Tensor:
    """``value + c CE`` on the student's logits (``value`` itself without ``ce_weight``)."""
    if not setup.ce_weight:
        return value
    logits = adapted_S.logits[0]
    flat = logits.reshape(-1, logits.size(-1)).float()
    targets = _labels(setup, adapted_S, mask).reshape(-1).long()
    summed = torch.nn.functional.cross_entropy(flat, targets, ignore_index=setup.ignore_index,
                                               reduction="sum")
    return value + setup.ce_weight * summed / (targets != setup.ignore_index).sum().clamp_min(1)


FormFn = Callable[[Adapted, Adapted], Tensor]


def logits_form(setup: Setup) -> FormFn:
    """Both sides' ``logits``: :func:`logits_kd` with the divergence as its loss (every logits
    pair, probability shift), plus the CE."""
    dense = losses.divergence(setup.loss, **setup.params)

    def loss(logits_S: Tensor, logits_T: Tensor, temperature: Any,
             mask: Tensor | None = None) -> Tensor:
        return dense(logits_S, logits_T, temperature=temperature, mask=mask,
                     shared_vocab=setup.shared_vocab)

    kd = logits_kd(loss, setup.temperature, schedules.constant_temperature,
                   setup.shift_probability, name=setup.name)

    def form(adapted_S: Adapted, adapted_T: Adapted) -> Tensor:
        value = kd.fn(adapted_S, adapted_T, _NO_CONTEXT)[setup.name]
        if not setup.ce_weight:
            return value
        return _plus_text(setup, value, adapted_S, kept(adapted_S, adapted_T).mask)

    return form


def topk_form(setup: Setup) -> FormFn:
    """The student's ``logits`` against a top-k teacher: ``topk_<loss>``, plus the CE."""
    topk_name = declared(setup.loss, "token_kd").topk_name

    def form(adapted_S: Adapted, adapted_T: Adapted) -> Tensor:
        mask, teacher = kept(adapted_S, adapted_T)
        assert topk_name is not None and teacher.topk_ids is not None
        assert teacher.topk_logprobs is not None
        value = topk_loss(topk_name, adapted_S.logits[0], teacher.topk_ids, teacher.topk_logprobs,
                          tail=setup.tail, temperature=setup.temperature, mask=mask,
                          **setup.params)
        return _plus_text(setup, value, adapted_S, mask)

    return form


def fused_form(setup: Setup) -> FormFn:
    """The student's fused output layer against the teacher's (dense) or its top-k, the CE in
    the same pass (:func:`~purekd.losses.fused_linear_distill`)."""
    topk_name = declared(setup.loss, "token_kd").topk_name

    def form(adapted_S: Adapted, adapted_T: Adapted) -> Tensor:
        mask, teacher = kept(adapted_S, adapted_T)
        assert adapted_S.lm_hidden is not None and adapted_S.lm_weight is not None
        if _topk(teacher):
            assert teacher.topk_ids is not None and teacher.topk_logprobs is not None
            source: Any = losses.TopkTeacher(teacher.topk_ids, teacher.topk_logprobs)
            options: dict[str, Any] = {"loss": topk_name, "tail": setup.tail}
        else:
            assert teacher.lm_hidden is not None and teacher.lm_weight is not None
            source = losses.DenseTeacher(teacher.lm_hidden, teacher.lm_weight, teacher.lm_bias)
            options = {"loss": setup.loss, "shared_vocab": setup.shared_vocab}
        labels = _labels(setup, adapted_S, mask) if setup.ce_weight else None
        return losses.fused_linear_distill(
            adapted_S.lm_hidden, adapted_S.lm_weight, source, bias_S=adapted_S.lm_bias,
            labels=labels, kd_weight=1.0, ce_weight=setup.ce_weight,
            ignore_index=setup.ignore_index, temperature=setup.temperature, mask=mask,
            **options, **setup.params).loss

    return form


_NO_CONTEXT: Any = None  # logits_kd's term does not read its context


# ----------------------------------------------------------------------- checks
_NAMES = {"logits": "'logits'", "fused": "'lm_hidden' + 'lm_weight'",
          "topk": "'topk_ids' + 'topk_logprobs'"}


def _form_name(adapted: Adapted) -> str:
    return "logits" if adapted.logits else ("fused" if _fused(adapted) else "topk")


def check_forms(setup: Setup, adapted_S: Adapted, adapted_T: Adapted) -> None:
    """The two sides' forms fit together and the options fit the forms."""
    form_S, form_T = _form_name(adapted_S), _form_name(adapted_T)
    if form_S == "topk":
        raise ValueError(
            "the student's adaptor returned 'topk_ids': top-k outputs are a teacher's (from its "
            "cache); the student returns 'logits', or 'lm_hidden' + 'lm_weight'")
    if form_S != form_T and form_T != "topk":
        raise ValueError(
            f"the student's adaptor returned {_NAMES[form_S]} but the teacher's "
            f"{_NAMES[form_T]}: return the same form from both (the fused path needs "
            "'lm_hidden' + 'lm_weight' from both adaptors), or top-k from the teacher")
    if form_T == "topk" and declared(setup.loss, "token_kd").topk_name is None:
        raise ValueError(
            f"kd_loss_type={setup.loss!r} has no top-k form; with a top-k teacher ('topk_ids', "
            f"'topk_logprobs') use one of {sorted(losses._divergences.topk_forms())}")
    if setup.tail and form_T != "topk":
        raise ValueError(f"kd_loss_type=[{setup.loss!r}, {{'tail': True}}]: tail is for a top-k "
                         "teacher ('topk_ids', 'topk_logprobs'); this teacher returns the whole "
                         "distribution, so leave tail out")
    if setup.shift_probability and (form_S != "logits" or form_T != "logits"):
        raise ValueError("probability_shift=True needs the teacher's and the student's 'logits'; "
                         "it has no fused or top-k form")


def check_rows(setup: Setup, adapted_S: Adapted, adapted_T: Adapted) -> None:
    """Vocabulary sizes, row masks and rows of the non-logits forms (the logits form:
    :func:`check_logits`)."""
    rows_S, rows_T = _rows(adapted_S), _rows(adapted_T)
    assert rows_S is not None and rows_T is not None
    what = "the output layers"
    if _fused(adapted_T) and not setup.shared_vocab:
        assert adapted_S.lm_weight is not None and adapted_T.lm_weight is not None
        size_S, size_T = adapted_S.lm_weight.size(0), adapted_T.lm_weight.size(0)
        if size_S != size_T:
            raise ValueError(vocabulary_mismatch(what, size_S, size_T, SHARED_VOCAB_OPTION))
    view_S, view_T = _as_logits(adapted_S, rows_S), _as_logits(adapted_T, rows_T)
    for side, own, rows in (("student", view_S, rows_S), ("teacher", view_T, rows_T)):
        given = own.logits_mask[0] if own.logits_mask else None
        if given is not None and not fits(given, rows):
            raise ValueError(
                f"the {side}'s logits_mask has shape {tuple(given.shape)} but its rows ({what}) "
                f"have shape {tuple(rows.shape[:-1])}: a logits mask selects rows, so its shape "
                f"must be {tuple(rows.shape[:-1])}")
    mask, mask_T = row_masks(view_S, view_T, 0, rows_S, rows_T)
    if mask is not None and mask_T is not None:
        check_paired_rows(what, mask, mask_T)
    elif tuple(rows_S.shape[:-1]) != tuple(rows_T.shape[:-1]):
        raise ValueError(
            f"{what}: the student has rows {tuple(rows_S.shape[:-1])} but the teacher "
            f"{tuple(rows_T.shape[:-1])}; the KD loss compares row by row, so both must have "
            "the same rows (or give each side its own logits_mask keeping as many)")
    if adapted_T.topk_mask is not None and not fits(adapted_T.topk_mask, rows_T):
        raise ValueError(
            f"the teacher's topk_mask has shape {tuple(adapted_T.topk_mask.shape)} but its "
            f"topk_ids have rows {tuple(rows_T.shape[:-1])}")


def check_labels(setup: Setup, adapted_S: Adapted) -> None:
    """With ``ce_weight``, the student's labels: one per row."""
    if not setup.ce_weight:
        return
    if not adapted_S.labels:
        raise ValueError(
            f"token_kd(ce_weight={setup.ce_weight}) needs the student's labels: return "
            "'labels' from the student's adaptor (for a causal LM, "
            "hf_adaptor(causal=True, labels_key='input_ids') gives the next tokens)")
    rows = _rows(adapted_S)
    assert rows is not None
    if not fits(adapted_S.labels[0], rows):
        raise ValueError(
            f"token_kd(ce_weight={setup.ce_weight}): the student's labels have shape "
            f"{tuple(adapted_S.labels[0].shape)} but its rows {tuple(rows.shape[:-1])}; one "
            "label per row")


def _check_masks_fit(adapted_S: Adapted, adapted_T: Adapted) -> None:
    """Every logits mask selects rows of its logits (TextBrewer's losses ignore a misfit on 2-d
    logits with a warning; a token-level divergence refuses it)."""
    for side, own in (("student", adapted_S), ("teacher", adapted_T)):
        masks = own.logits_mask
        for i, logits in enumerate(own.logits):
            given = (masks[i] if len(masks) > 1 else masks[0]) if masks else None
            if given is not None and not fits(given, logits):
                raise ValueError(
                    f"the {side}'s logits_mask has shape {tuple(given.shape)} but its rows "
                    f"(logits[{i}]) have shape {tuple(logits.shape[:-1])}: a logits mask selects "
                    f"rows, so its shape must be {tuple(logits.shape[:-1])}")


# ----------------------------------------------------------------------- the term
def _setup(loss: str, temperature: float, params: Mapping[str, Any] | None, shared_vocab: bool,
           shift_probability: bool, ce_weight: float, ignore_index: int, name: str) -> Setup:
    """The validated :class:`Setup` (unknown loss, parameters, a bad ``ce_weight`` raise)."""
    if not isinstance(loss, str) or loss not in losses._divergences.names():
        raise ValueError(f"token_kd: unknown loss {loss!r}; valid names: "
                         f"{losses._divergences.names()}")
    given = dict(params or {})
    tail = given.pop("tail", False)
    if not isinstance(tail, bool):
        raise TypeError(f"token_kd: tail must be True or False, got {tail!r}")
    if tail and declared(loss, "token_kd").topk_name is None:
        raise ValueError(f"token_kd: loss {loss!r} has no parameter 'tail' (it has no top-k form)")
    try:
        values = parameters(loss, "token_kd", given)
    except TypeError as error:
        raise ValueError(f"token_kd: loss {loss!r} has no parameter(s) "
                         f"{sorted(set(given) - set(declared(loss, 'token_kd').defaults))}; "
                         f"({error})") from None
    if isinstance(ce_weight, bool) or not isinstance(ce_weight, (int, float)) or not (
            math.isfinite(ce_weight) and ce_weight >= 0):
        raise ValueError(f"token_kd: ce_weight={ce_weight!r}; expected a number >= 0 (0: no "
                         "cross-entropy in the term)")
    return Setup(loss, values, tail, temperature, shared_vocab, shift_probability,
                 float(ce_weight), ignore_index, name)


def token_kd(
    loss: str = "forward_kl",
    *,
    temperature: float = 1.0,
    params: Mapping[str, Any] | None = None,
    shared_vocab: bool = False,
    shift_probability: bool = False,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    weight: Weight = 1.0,
    name: str = "kd_loss",
) -> Term:
    r"""A term ``{name: D(p_S, p_T)}``: the token-level divergence ``loss`` (a name registered
    with :func:`~purekd.losses.register_divergence`), mean over the kept rows, at
    ``temperature`` (no :math:`\tau^2`).

    ``params``: the divergence's parameters (``beta`` for ``jsd``/``scaled_jsd``, ``alpha`` for
    the skew KLs, ``tail`` for a top-k teacher). ``shared_vocab``: compare vocabularies of
    different sizes on their shared first entries (padded output layers); without it a
    mismatch raises before the loss path, naming both sizes. ``shift_probability``: TextBrewer's
    probability shift of the teacher's logits (logits only).

    ``ce_weight`` ``c``: the term's value is :math:`D + c\,\mathrm{CE}`, with CE the student's
    cross-entropy on its ``labels`` (temperature 1, mean over the kept rows with a label other
    than ``ignore_index``; with ``hf_adaptor(causal=True, labels_key="input_ids")`` the labels
    are the next tokens). On the fused forms the CE comes out of the same pass over the
    vocabulary as the divergence (:func:`~purekd.losses.fused_linear_distill`): mixing in the
    text's own next tokens costs no second pass over the output layer — with a separate
    hard-label term it would cost one. The term's weight multiplies both: ``weight=0.5,
    ce_weight=1`` is half KD, half CE.

    The forms are in the module docstring. The term's ``kept_rows`` is the number of kept rows,
    for token-correct normalisation. Returns ``{}`` when either side has no distribution.
    """
    setup = _setup(loss, temperature, params, shared_vocab, shift_probability, ce_weight,
                   ignore_index, name)
    on_logits, on_topk, fused = logits_form(setup), topk_form(setup), fused_form(setup)
    first = FirstBatch(name)

    def term(adapted_S: Adapted, adapted_T: Adapted, ctx: Context) -> dict[str, Tensor]:
        del ctx
        if _rows(adapted_S) is None or _rows(adapted_T) is None:
            return {}
        form = (fused if _fused(adapted_S) else on_topk if _topk(adapted_T) else on_logits)
        return {name: form(adapted_S, adapted_T)}

    def check(adapted_S: Adapted, adapted_T: Adapted) -> None:
        if _rows(adapted_S) is None or _rows(adapted_T) is None:
            return
        check_forms(setup, adapted_S, adapted_T)
        if adapted_S.logits and adapted_T.logits:
            _check_masks_fit(adapted_S, adapted_T)  # token-level: a misfit is an error
            check_logits(adapted_S, adapted_T, shift_probability, shared_vocab=shared_vocab,
                         vocabulary_option=SHARED_VOCAB_OPTION)
        else:
            check_rows(setup, adapted_S, adapted_T)
        check_labels(setup, adapted_S)
        if not first.seen:
            first.warn_if_no_rows_kept(kept(adapted_S, adapted_T).mask)

    return Term(term, weight, check, name, kept_rows=count)


__all__ = ["SHARED_VOCAB_OPTION", "Kept", "Setup", "check_forms", "check_labels", "check_rows",
           "count", "fused_form", "kept", "logits_form", "token_kd", "topk_form"]
