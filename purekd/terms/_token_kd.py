"""The token-level KD term: a divergence of the family on logits, fused hidden states or top-k.

One term, three forms of the same distillation, chosen by what the adaptors return:

============================  =====================================  ==========================
student's adaptor             teacher's adaptor                      loss
============================  =====================================  ==========================
``logits``                    ``logits``                             ``losses.<loss>``
``logits``                    ``topk_ids`` + ``topk_logprobs``       ``losses.topk_<loss>``
``lm_hidden`` + ``lm_weight`` ``lm_hidden`` + ``lm_weight``          ``losses.fused_linear_kd``
``lm_hidden`` + ``lm_weight`` ``topk_ids`` + ``topk_logprobs``       ``losses.fused_linear_topk_kl``
============================  =====================================  ==========================

``lm_bias`` goes with ``lm_weight`` when the output layer has one. The fused forms never hold
``(rows, V)`` logits. Rows and masks follow :func:`~purekd.terms.logits_kd`: the student's
``logits_mask`` (else the teacher's) selects rows; two different masks pair the k-th kept rows;
a teacher's ``topk_mask`` (rows its cache has) further removes rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from purekd import losses
from purekd.losses._topk import topk_loss
from purekd.presets import TOKEN_KD_LOSSES, TOPK_FORMS
from purekd.stages import Adapted, probability_shift

from ._context import Context, Term, Weight
from ._logits_kd import (
    align_teacher_rows,
    check_paired_rows,
    fits,
    row_masks,
    vocabulary_mismatch,
)

SHARED_VOCAB_OPTION = ("set DistillationConfig(shared_vocab=True) (token_kd(shared_vocab=True)) "
                       "to compare on the first min(V_S, V_T) entries")


class Rows(NamedTuple):
    """One side's distribution, in whichever form its adaptor returned it."""

    form: str  # "logits", "fused" or "topk"
    rows: Tensor  # the tensor whose leading dimensions are the rows
    vocabulary: int | None  # None for top-k


def _rows(adapted: Adapted) -> Rows | None:
    if adapted.logits:
        return Rows("logits", adapted.logits[0], adapted.logits[0].size(-1))
    if adapted.lm_hidden is not None and adapted.lm_weight is not None:
        return Rows("fused", adapted.lm_hidden, adapted.lm_weight.size(0))
    if adapted.topk_ids is not None:
        return Rows("topk", adapted.topk_ids, None)
    return None


_NAMES = {"logits": "'logits'", "fused": "'lm_hidden' + 'lm_weight'",
          "topk": "'topk_ids' + 'topk_logprobs'"}


def _masks(adapted_S: Adapted, adapted_T: Adapted, rows_S: Tensor,
           rows_T: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``(mask, mask_T)`` as :func:`~purekd.terms.row_masks`, where LM outputs stand for logits."""
    view_S = adapted_S._replace(logits=adapted_S.logits or (rows_S,))
    view_T = adapted_T._replace(logits=adapted_T.logits or (rows_T,))
    return row_masks(view_S, view_T, 0, rows_S, rows_T)


def _with_topk_mask(mask: Tensor | None, topk_mask: Tensor | None) -> Tensor | None:
    if topk_mask is None:
        return mask
    keep = topk_mask != 0
    return keep.to(torch.int64) if mask is None else ((mask != 0) & keep).to(torch.int64)


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
    r"""A term ``{name: D(p_S, p_T)}``: the token-level divergence ``loss`` (a key of
    :data:`TOKEN_KD_LOSSES`), mean over the kept rows, at ``temperature`` (no :math:`\tau^2`).

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

    The dispatch on the adaptors' keys is in the module docstring. The term's ``kept_rows`` is the
    number of kept rows, for token-correct normalisation. Returns ``{}`` when either side has no
    distribution.
    """
    if loss not in TOKEN_KD_LOSSES:
        raise ValueError(f"token_kd: unknown loss {loss!r}; valid names: {sorted(TOKEN_KD_LOSSES)}")
    args = {**TOKEN_KD_LOSSES[loss], **dict(params or {})}
    unknown = sorted(set(args) - set(TOKEN_KD_LOSSES[loss]))
    if unknown:
        raise ValueError(f"token_kd: loss {loss!r} takes no parameter(s) {unknown}; its "
                         f"parameters: {sorted(TOKEN_KD_LOSSES[loss]) or 'none'}")
    tail = bool(args.pop("tail", False))
    dense = losses.divergence(loss)
    if isinstance(ce_weight, bool) or not isinstance(ce_weight, (int, float)) or not (
            math.isfinite(ce_weight) and ce_weight >= 0):
        raise ValueError(f"token_kd: ce_weight={ce_weight!r}; expected a number >= 0 (0: no "
                         "cross-entropy in the term)")
    with_ce = ce_weight != 0

    def labels_for(adapted_S: Adapted, mask: Tensor | None) -> Tensor:
        """The student's labels, ``ignore_index`` in the rows the KD leaves out."""
        labels = adapted_S.labels[0]
        return labels if mask is None else torch.where(mask != 0, labels, ignore_index)

    def plus_text(value: Tensor, adapted_S: Adapted, mask: Tensor | None) -> Tensor:
        """``value + c CE`` on the student's logits (``value`` itself without ``ce_weight``)."""
        if not with_ce:
            return value
        return value + ce_weight * _cross_entropy(adapted_S.logits[0],
                                                  labels_for(adapted_S, mask), ignore_index)

    def fused(adapted_S: Adapted, source: losses.DenseTeacher | losses.TopkTeacher,
              **options: Any) -> Tensor:
        """The fused form against ``source`` (``options`` include the ``mask``), with the CE
        in the same pass when ``with_ce``."""
        hidden_S, weight_S = adapted_S.lm_hidden, adapted_S.lm_weight
        assert hidden_S is not None and weight_S is not None
        labels = labels_for(adapted_S, options["mask"]) if with_ce else None
        return losses.fused_linear_distill(
            hidden_S, weight_S, source, bias_S=adapted_S.lm_bias, labels=labels, kd_weight=1.0,
            ce_weight=ce_weight, ignore_index=ignore_index, **options).loss

    def pieces(adapted_S: Adapted, adapted_T: Adapted, *, rows_only: bool = False
               ) -> tuple[Adapted, Rows, Rows, Tensor | None]:
        """The teacher with its rows aligned to the student's (only its ``topk_mask`` when
        ``rows_only``), both forms, and the mask of the kept rows."""
        side_S, side_T = _rows(adapted_S), _rows(adapted_T)
        assert side_S is not None and side_T is not None
        mask, mask_T = _masks(adapted_S, adapted_T, side_S.rows, side_T.rows)
        teacher = adapted_T
        if mask is not None and mask_T is not None:
            topk_mask = adapted_T.topk_mask
            if topk_mask is not None:
                topk_mask = align_teacher_rows(topk_mask.unsqueeze(-1), mask_T, mask).squeeze(-1)
            teacher = adapted_T._replace(topk_mask=topk_mask)
            if not rows_only:
                def align(t: Tensor | None) -> Tensor | None:
                    return None if t is None else align_teacher_rows(t, mask_T, mask)
                teacher = teacher._replace(
                    logits=tuple(align_teacher_rows(t, mask_T, mask) for t in adapted_T.logits[:1])
                    + adapted_T.logits[1:],
                    lm_hidden=align(adapted_T.lm_hidden), topk_ids=align(adapted_T.topk_ids),
                    topk_logprobs=align(adapted_T.topk_logprobs))
        return teacher, side_S, side_T, _with_topk_mask(mask, teacher.topk_mask)

    def term(adapted_S: Adapted, adapted_T: Adapted, ctx: Context) -> dict[str, Tensor]:
        del ctx
        if _rows(adapted_S) is None or _rows(adapted_T) is None:
            return {}
        teacher, side_S, side_T, mask = pieces(adapted_S, adapted_T)
        common: dict[str, Any] = {"temperature": temperature, "mask": mask}
        if side_S.form == "logits" and side_T.form == "logits":
            total: Tensor | None = None
            for i, l_S in enumerate(adapted_S.logits):
                l_T = teacher.logits[i]
                mask_i = mask
                if i > 0:  # further logits pairs: their own masks, as logits_kd
                    mask_i, mask_T = row_masks(adapted_S, adapted_T, i, l_S, adapted_T.logits[i])
                    if mask_i is not None and mask_T is not None:
                        l_T = align_teacher_rows(l_T, mask_T, mask_i)
                if shift_probability:
                    l_T = probability_shift(l_T, adapted_S.labels[i])
                value = dense(l_S, l_T, **{**common, "mask": mask_i}, shared_vocab=shared_vocab,
                              **args)
                total = value if total is None else total + value
            assert total is not None
            return {name: plus_text(total, adapted_S, mask)}
        if side_T.form == "topk":
            ids, logprobs = teacher.topk_ids, teacher.topk_logprobs
            assert ids is not None and logprobs is not None
            if side_S.form == "logits":
                value = plus_text(topk_loss(TOPK_FORMS[loss], adapted_S.logits[0], ids, logprobs,
                                            tail=tail, **common, **args), adapted_S, mask)
            else:
                value = fused(adapted_S, losses.TopkTeacher(ids, logprobs),
                              loss=TOPK_FORMS[loss], tail=tail, **common, **args)
            return {name: value}
        hidden_T, weight_T = teacher.lm_hidden, teacher.lm_weight
        assert hidden_T is not None and weight_T is not None
        value = fused(adapted_S, losses.DenseTeacher(hidden_T, weight_T, teacher.lm_bias),
                      loss=loss, shared_vocab=shared_vocab, **common, **args)
        return {name: value}

    def check(adapted_S: Adapted, adapted_T: Adapted) -> None:
        side_S, side_T = _rows(adapted_S), _rows(adapted_T)
        if side_S is None or side_T is None:
            return
        _check_forms(side_S, side_T, loss, shift_probability, tail)
        if side_S.form == "logits" and side_T.form == "logits":
            if len(adapted_S.logits) != len(adapted_T.logits):
                raise ValueError(
                    f"the student's adaptor returned {len(adapted_S.logits)} logits but the "
                    f"teacher's {len(adapted_T.logits)}: both must return the same number")
            pairs = list(zip(adapted_S.logits, adapted_T.logits, strict=True))
        else:
            pairs = [(side_S.rows, side_T.rows)]
        for i, (rows_S, rows_T) in enumerate(pairs):
            what = f"logits[{i}]" if side_S.form == "logits" else "the output layers"
            if side_T.vocabulary is not None and side_S.vocabulary is not None and not shared_vocab:
                size_S = rows_S.size(-1) if side_S.form == "logits" else side_S.vocabulary
                size_T = rows_T.size(-1) if side_T.form == "logits" else side_T.vocabulary
                if size_S != size_T:
                    raise ValueError(vocabulary_mismatch(what, size_S, size_T,
                                                         SHARED_VOCAB_OPTION))
            view_S = adapted_S._replace(logits=adapted_S.logits or (rows_S,))
            view_T = adapted_T._replace(logits=adapted_T.logits or (rows_T,))
            mask, mask_T = row_masks(view_S, view_T, i, rows_S, rows_T)
            for side, own, rows in (("student", view_S, rows_S), ("teacher", view_T, rows_T)):
                masks = own.logits_mask
                given = masks[i] if len(masks) > 1 else (masks[0] if masks else None)
                if given is not None and not fits(given, rows):
                    raise ValueError(
                        f"the {side}'s logits_mask has shape {tuple(given.shape)} but its rows "
                        f"({what}) have shape {tuple(rows.shape[:-1])}: a logits mask selects "
                        f"rows, so its shape must be {tuple(rows.shape[:-1])}")
            if mask is not None and mask_T is not None:
                check_paired_rows(what, mask, mask_T)
            elif tuple(rows_S.shape[:-1]) != tuple(rows_T.shape[:-1]):
                raise ValueError(
                    f"{what}: the student has rows {tuple(rows_S.shape[:-1])} but the teacher "
                    f"{tuple(rows_T.shape[:-1])}; the KD loss compares row by row, so both must "
                    "have the same rows (or give each side its own logits_mask keeping as many)")
        if adapted_T.topk_mask is not None and not fits(adapted_T.topk_mask, side_T.rows):
            raise ValueError(
                f"the teacher's topk_mask has shape {tuple(adapted_T.topk_mask.shape)} but its "
                f"topk_ids have rows {tuple(side_T.rows.shape[:-1])}")
        if with_ce:
            if not adapted_S.labels:
                raise ValueError(
                    f"token_kd(ce_weight={ce_weight}) needs the student's labels: return "
                    "'labels' from the student's adaptor (for a causal LM, "
                    "hf_adaptor(causal=True, labels_key='input_ids') gives the next tokens)")
            if not fits(adapted_S.labels[0], side_S.rows):
                raise ValueError(
                    f"token_kd(ce_weight={ce_weight}): the student's labels have shape "
                    f"{tuple(adapted_S.labels[0].shape)} but its rows "
                    f"{tuple(side_S.rows.shape[:-1])}; one label per row")
        if shift_probability and not adapted_S.labels:
            raise ValueError(
                "probability_shift=True needs the ground truth: return 'labels' from the "
                "student's adaptor (one tensor per logits tensor)")

    def count(adapted_S: Adapted, adapted_T: Adapted) -> Tensor | None:
        if _rows(adapted_S) is None or _rows(adapted_T) is None:
            return None
        _, side_S, _, mask = pieces(adapted_S, adapted_T, rows_only=True)
        dtype = torch.float64 if side_S.rows.dtype == torch.float64 else torch.float32
        if mask is None:
            return torch.full((), side_S.rows[..., 0].numel(), dtype=dtype,
                              device=side_S.rows.device)
        return (mask != 0).sum().to(dtype)

    return Term(term, weight, check, name, kept_rows=count)


def _cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Mean cross-entropy over the rows with a label (0 when none has one)."""
    flat = logits.reshape(-1, logits.size(-1)).float()
    targets = labels.reshape(-1).long()
    summed = torch.nn.functional.cross_entropy(flat, targets, ignore_index=ignore_index,
                                               reduction="sum")
    return summed / (targets != ignore_index).sum().clamp_min(1)


def _check_forms(side_S: Rows, side_T: Rows, loss: str, shift_probability: bool,
                 tail: bool) -> None:
    if side_S.form == "topk":
        raise ValueError(
            "the student's adaptor returned 'topk_ids': top-k outputs are a teacher's (from its "
            "cache); the student returns 'logits', or 'lm_hidden' + 'lm_weight'")
    if side_S.form != side_T.form and side_T.form != "topk":
        raise ValueError(
            f"the student's adaptor returned {_NAMES[side_S.form]} but the teacher's "
            f"{_NAMES[side_T.form]}: return the same form from both (the fused path needs "
            "'lm_hidden' + 'lm_weight' from both adaptors), or top-k from the teacher")
    if side_T.form == "topk" and loss not in TOPK_FORMS:
        raise ValueError(
            f"kd_loss_type={loss!r} has no top-k form; with a top-k teacher ('topk_ids', "
            f"'topk_logprobs') use one of {sorted(TOPK_FORMS)}")
    if tail and side_T.form != "topk":
        raise ValueError(f"kd_loss_type=[{loss!r}, {{'tail': True}}]: tail is for a top-k teacher "
                         "('topk_ids', 'topk_logprobs'); this teacher returns the whole "
                         "distribution, so leave tail out")
    if shift_probability and (side_S.form != "logits" or side_T.form != "logits"):
        raise ValueError("probability_shift=True needs the teacher's and the student's 'logits'; "
                         "it has no fused or top-k form")


__all__ = ["SHARED_VOCAB_OPTION", "token_kd"]
