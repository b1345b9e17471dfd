"""The logits KD term: soft-label distillation on the adaptor's ``logits``."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from purekd import losses, schedules
from purekd.stages import Adapted, probability_shift

from ._context import Context, Term, Weight

KDLoss = Callable[..., Tensor]


def _own_mask(adapted: Adapted, index: int) -> Tensor | None:
    masks = adapted.logits_mask
    if not masks:
        return None
    return masks[index] if len(masks) > 1 else masks[0]


def fits(mask: Tensor | None, logits: Tensor) -> bool:
    """Whether ``mask`` selects rows of ``logits``: its shape is ``logits.shape[:-1]``."""
    return mask is not None and tuple(mask.shape) == tuple(logits.shape[:-1])


def row_masks(adapted_S: Adapted, adapted_T: Adapted, index: int, logits_S: Tensor,
              logits_T: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``(mask, mask_T)`` for the ``index``-th pair.

    ``mask`` selects the student's rows (the student's own ``logits_mask``, else the teacher's:
    one mask serves both sides); ``mask_T`` is the teacher's own, different mask when both sides
    have one, so that the k-th kept rows are paired (:func:`align_teacher_rows`), else ``None``.
    A mask whose shape does not fit 2-d logits' rows is left out (TextBrewer's rule; the check
    warns about it).
    """
    mask_S, mask_T = _own_mask(adapted_S, index), _own_mask(adapted_T, index)
    mask_S = mask_S if fits(mask_S, logits_S) else None
    mask_T = mask_T if fits(mask_T, logits_T) else None
    if mask_S is None:
        return (mask_T if fits(mask_T, logits_S) else None), None
    return mask_S, (mask_T if mask_T is not None and mask_T is not mask_S else None)


def logits_mask_for(adapted_S: Adapted, adapted_T: Adapted, index: int) -> Tensor | None:
    """The row mask for the ``index``-th logits pair: the student's ``logits_mask`` if it has
    one, else the teacher's (a single mask serves every logits tensor)."""
    mask = _own_mask(adapted_S, index)
    return mask if mask is not None else _own_mask(adapted_T, index)


def align_teacher_rows(logits_T: Tensor, mask_T: Tensor, mask_S: Tensor) -> Tensor:
    """Teacher rows rearranged so that the k-th row the student's mask keeps faces the k-th row
    the teacher's mask keeps (TextBrewer selects each side with its own mask and pairs the
    selected rows in order — e.g. word-level masks over different tokenisations).

    ``logits_T`` ``(*rows_T, C)``, ``mask_T`` ``rows_T``, ``mask_S`` ``rows_S``; returns
    ``(*rows_S, C)`` with zeros in the rows the student's mask drops. Static shapes throughout
    (ranks by ``cumsum``, then ``index_copy`` / ``index_select``), so it compiles without breaks.
    """
    classes = logits_T.size(-1)
    flat_T = logits_T.reshape(-1, classes)
    keep_T = (mask_T != 0).reshape(-1)
    keep_S = (mask_S != 0).reshape(-1)
    rows_T = flat_T.size(0)
    trash = torch.full_like(keep_T, rows_T, dtype=torch.long)
    by_rank = torch.zeros(rows_T + 1, classes, dtype=flat_T.dtype, device=flat_T.device)
    by_rank = by_rank.index_copy(0, torch.where(keep_T, keep_T.long().cumsum(0) - 1, trash), flat_T)
    rank_S = (keep_S.long().cumsum(0) - 1).clamp(max=rows_T)
    source = torch.where(keep_S, rank_S, torch.full_like(rank_S, rows_T))
    return by_rank.index_select(0, source).reshape(*mask_S.shape, classes)


def check_logits(adapted_S: Adapted, adapted_T: Adapted, shift_probability: bool = False, *,
                 shared_vocab: bool | None = None, vocabulary_option: str | None = None) -> None:
    """Teacher and student logits must pair up one to one with equal shapes.

    ``shared_vocab`` (the token-level divergences): ``None`` — a class dimension that differs is
    an error (TextBrewer's losses); ``False`` — likewise, said as a vocabulary mismatch that
    names ``vocabulary_option``, the fix; ``True`` — the class dimensions may differ."""
    if not adapted_S.logits or not adapted_T.logits:
        return
    shapes_S = [tuple(t.shape) for t in adapted_S.logits]
    shapes_T = [tuple(t.shape) for t in adapted_T.logits]
    if len(shapes_S) != len(shapes_T):
        raise ValueError(
            f"the student's adaptor returned {len(shapes_S)} logits {shapes_S} but the teacher's "
            f"returned {len(shapes_T)} {shapes_T}: both must return the same number of logits"
        )
    for i, (s, t) in enumerate(zip(shapes_S, shapes_T, strict=True)):
        _check_masks_fit(adapted_S, adapted_T, i)
        mask_S, mask_T = row_masks(adapted_S, adapted_T, i, adapted_S.logits[i],
                                   adapted_T.logits[i])
        if shared_vocab is False and s[-1] != t[-1]:
            raise ValueError(vocabulary_mismatch(f"logits[{i}]", s[-1], t[-1], vocabulary_option))
        classes_agree = s[-1] == t[-1] or bool(shared_vocab)  # shared: compared on the first
        if mask_S is not None and mask_T is not None:
            _check_separately_masked(adapted_S, adapted_T, i, s, t, classes_agree)
            continue
        if s[:-1] != t[:-1] or not classes_agree:
            what = "class dimension" if s[:-1] == t[:-1] else "shape"
            raise ValueError(
                f"logits[{i}] differ in {what}: student {s}, teacher {t}; the KD loss compares "
                "them row by row and entry by entry, so both must have the same rows and the "
                "same shape"
            )
    if shift_probability:
        if not adapted_S.labels:
            raise ValueError(
                "probability_shift=True needs the ground truth: return 'labels' from the "
                "student's adaptor (one tensor per logits tensor)"
            )
        for i, (labels, logits) in enumerate(zip(adapted_S.labels, adapted_S.logits, strict=True)):
            if tuple(labels.shape) != tuple(logits.shape[:-1]):
                raise ValueError(
                    f"labels[{i}] has shape {tuple(labels.shape)} but logits[{i}] has shape "
                    f"{tuple(logits.shape)}: labels must have shape {tuple(logits.shape[:-1])}"
                )


CROSS_TOKENIZER_HINT = (" If the two models have different tokenizers, distil across tokenizers "
                        "instead: batches from purekd.stages.CrossTokenizerCollator and "
                        "kd_loss_type='gold' or 'uld' (docs/cross-tokenizer.md)")


def vocabulary_mismatch(what: str, size_S: int, size_T: int, option: str | None = None) -> str:
    """The message for teacher and student distributions over vocabularies of different sizes."""
    fix = (f" If the two models share a tokenizer and one output layer is padded (e.g. Qwen2.5's "
           f"151936 or 152064 rows for 151665 tokens), {option}; never pad the smaller one "
           "with zeros, which gives the padding ids probability mass"
           if option else "")
    return (f"{what}: the student's vocabulary has {size_S} entries but the teacher's has "
            f"{size_T}; the KD loss compares the two distributions entry by entry, so both "
            f"models must score the same vocabulary.{fix}{'.' if fix else ''}{CROSS_TOKENIZER_HINT}")


def _check_masks_fit(adapted_S: Adapted, adapted_T: Adapted, index: int) -> None:
    """A mask must fit its logits' rows; for 2-d logits TextBrewer ignores one that does not,
    which is said with a warning (never silently)."""
    masks = (("student", _own_mask(adapted_S, index), adapted_S.logits[index]),
             ("teacher", _own_mask(adapted_T, index), adapted_T.logits[index]))
    for side, mask, logits in masks:
        if mask is None or fits(mask, logits):
            continue
        if logits.dim() != 2:
            raise ValueError(
                f"the {side}'s logits_mask for logits[{index}] has shape {tuple(mask.shape)} "
                f"but the logits have shape {tuple(logits.shape)}: a logits mask selects rows, so "
                f"its shape must be {tuple(logits.shape[:-1])}")
        shared = len(adapted_S.logits) > 1 and any(fits(mask, other) for other in
                                                   (adapted_S.logits + adapted_T.logits))
        if not shared:  # a mask that serves other, token-level logits is TextBrewer's own case
            warnings.warn(
                f"the {side}'s logits_mask of shape {tuple(mask.shape)} does not fit the rows of "
                f"logits[{index}] {tuple(logits.shape)} and is ignored, as TextBrewer ignores "
                f"masks on 2-d logits; to mask these rows give a mask of shape "
                f"{tuple(logits.shape[:-1])}, else leave 'logits_mask' out",
                stacklevel=2)


def _check_separately_masked(adapted_S: Adapted, adapted_T: Adapted, index: int,
                             shape_S: tuple[int, ...], shape_T: tuple[int, ...],
                             classes_agree: bool) -> None:
    mask_S, mask_T = _own_mask(adapted_S, index), _own_mask(adapted_T, index)
    assert mask_S is not None and mask_T is not None
    if not classes_agree:
        raise ValueError(f"logits[{index}] differ in class dimension: student {shape_S}, "
                         f"teacher {shape_T}")
    for side, mask, shape in (("student", mask_S, shape_S), ("teacher", mask_T, shape_T)):
        if tuple(mask.shape) != shape[:-1]:
            raise ValueError(f"the {side}'s logits_mask[{index}] has shape {tuple(mask.shape)} "
                             f"but its logits[{index}] have shape {shape}")
    check_paired_rows(f"logits[{index}]", mask_S, mask_T)


def check_paired_rows(what: str, mask_S: Tensor, mask_T: Tensor) -> None:
    """Two masks pair their kept rows in order, so both must keep as many (one host sync)."""
    kept_S, kept_T = int((mask_S != 0).sum()), int((mask_T != 0).sum())
    if kept_S != kept_T:
        raise ValueError(
            f"{what}: the student's logits_mask keeps {kept_S} rows but the teacher's keeps "
            f"{kept_T}; the kept rows are paired in order, so both masks must keep the same "
            "number")


def _positional_capacity(fn: Callable[..., Any]) -> int:
    """How many positional arguments ``fn`` accepts (a large number for ``*args``)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume purekd's 4
        return 4
    count = 0
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return 1 << 16
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY,
                              inspect.Parameter.POSITIONAL_OR_KEYWORD):
            count += 1
    return count


def kd_loss_caller(kd_loss: KDLoss) -> Callable[[Tensor, Tensor, Any, Tensor | None], Tensor]:
    """``call(logits_S, logits_T, temperature, mask)`` for a KD loss of either signature.

    * purekd's ``kd_loss(logits_S, logits_T, temperature, mask)``: the mask goes in as the 4th
      argument when there is one;
    * TextBrewer's ``kd_loss(logits_S, logits_T, temperature)`` (e.g. one added with
      ``register_new('kd_loss', ...)``): called with three arguments, as TextBrewer calls it; with
      a mask, on the kept rows only (TextBrewer's ``masked_select`` of ``logits_mask``), a
      temperature per row selected likewise. The row selection has a data-dependent shape, so
      that case runs with a graph break under ``torch.compile``.
    """
    takes_mask = _positional_capacity(kd_loss) >= 4

    def call(logits_S: Tensor, logits_T: Tensor, temperature: Any, mask: Tensor | None) -> Tensor:
        if mask is None:
            return kd_loss(logits_S, logits_T, temperature)
        if takes_mask:
            return kd_loss(logits_S, logits_T, temperature, mask)
        keep = mask != 0
        if isinstance(temperature, Tensor) and temperature.dim() > 0:
            temperature = temperature.expand(mask.shape)[keep]
        return kd_loss(logits_S[keep], logits_T[keep], temperature)

    return call


class FirstBatch:
    """Checks a term makes once, on the first batch it sees (one host sync, once)."""

    def __init__(self, term: str) -> None:
        self.term = term
        self.seen = False

    def warn_if_no_rows_kept(self, mask: Tensor | None) -> None:
        """On the first batch only: a mask that keeps no row means the term is 0 and teaches
        nothing — most often every label is -100 (or every ``logits_mask`` entry 0)."""
        if self.seen:
            return
        self.seen = True
        if mask is not None and mask.numel() and not bool((mask != 0).any()):
            warnings.warn(
                f"{self.term}: no tokens kept in the first batch: every row of its mask is 0 (for "
                "a causal LM, every label -100: prompts masked out, or labels never set?), so "
                "the term is 0 and its gradient too. Check the labels and the adaptor's "
                "'logits_mask'; if every batch is like this, training stops at the first "
                "optimizer step because no gradient reaches the student", UserWarning,
                stacklevel=3)


def kept_rows(rows: Tensor, mask: Tensor | None) -> Tensor:
    """How many rows of ``rows`` (``(*rows, X)``: logits, hidden states or top-k ids) the mask
    keeps (all of them without one), as a 0-dim float: float32 at least, float64 for float64
    ``rows`` (the dtype every KD term counts its tokens in)."""
    dtype = torch.promote_types(rows.dtype, torch.float32)
    if mask is None:
        return torch.full((), rows[..., 0].numel(), dtype=dtype, device=rows.device)
    return (mask != 0).sum().to(dtype)


def logits_kd(
    kd_loss: KDLoss = losses.kd_ce,
    temperature: float = 4.0,
    temperature_schedule: Callable[..., float | Tensor] = schedules.constant_temperature,
    shift_probability: bool = False,
    weight: Weight = 1.0,
    name: str = "kd_loss",
) -> Term:
    r"""A term ``{name: sum_i kd_loss(logits_S[i], logits_T'[i], tau_i, mask_i)}``.

    * ``logits_T'`` is the teacher's logits, with :func:`~purekd.stages.probability_shift`
      applied from the student's ``labels`` when ``shift_probability``;
    * ``tau_i = temperature_schedule(logits_S[i], logits_T'[i], temperature[, mask_i])`` (the
      mask is passed only when there is one, so TextBrewer-style 3-argument schedules work);
    * ``mask_i`` is the ``logits_mask`` when its shape is the logits' rows,
      ``logits.shape[:-1]``: ``(B, L)`` for ``(B, L, C)`` logits, ``(N,)`` for flat ``(N, C)``
      token logits. (TextBrewer ignores masks on 2-d logits; purekd honours one that fits their
      rows, and ignores one that does not, e.g. a ``(B, L)`` mask beside ``(B, C)`` logits, with a
      warning.) When both sides return their own mask, each side keeps its own rows and the k-th
      kept student row meets the k-th kept teacher row (:func:`align_teacher_rows`), as in
      TextBrewer; when one side returns a mask, it serves both.
    * ``kd_loss`` is called as ``kd_loss(logits_S, logits_T, tau)`` when there is no mask, as
      TextBrewer does, and with the mask as a 4th argument when it takes one
      (:func:`kd_loss_caller`).

    The term's ``kept_rows`` is the number of rows ``logits[0]`` keeps (for token normalisation).
    Returns ``{}`` when either side has no logits.
    """
    call = kd_loss_caller(kd_loss)

    def term(adapted_S: Adapted, adapted_T: Adapted, ctx: Context) -> dict[str, Tensor]:
        del ctx
        if not adapted_S.logits or not adapted_T.logits:
            return {}
        total: Tensor | None = None
        for i, (l_S, l_T) in enumerate(zip(adapted_S.logits, adapted_T.logits, strict=True)):
            mask, mask_T = row_masks(adapted_S, adapted_T, i, l_S, l_T)
            if mask is not None and mask_T is not None:
                l_T = align_teacher_rows(l_T, mask_T, mask)
            if shift_probability:
                l_T = probability_shift(l_T, adapted_S.labels[i])
            tau = (temperature_schedule(l_S, l_T, temperature) if mask is None
                   else temperature_schedule(l_S, l_T, temperature, mask))
            value = call(l_S, l_T, tau, mask)
            total = value if total is None else total + value
        assert total is not None
        return {name: total}

    first = FirstBatch(name)

    def check(adapted_S: Adapted, adapted_T: Adapted) -> None:
        check_logits(adapted_S, adapted_T, shift_probability)
        if adapted_S.logits and adapted_T.logits:
            l_S = adapted_S.logits[0]
            first.warn_if_no_rows_kept(row_masks(adapted_S, adapted_T, 0, l_S,
                                                 adapted_T.logits[0])[0])

    def count(adapted_S: Adapted, adapted_T: Adapted) -> Tensor | None:
        if not adapted_S.logits or not adapted_T.logits:
            return None
        l_S = adapted_S.logits[0]
        return kept_rows(l_S, row_masks(adapted_S, adapted_T, 0, l_S, adapted_T.logits[0])[0])

    return Term(term, weight, check, name, kept_rows=count)


__all__ = ["FirstBatch", "align_teacher_rows", "check_logits", "fits", "kd_loss_caller", "kept_rows",
           "logits_kd", "logits_mask_for", "row_masks", "vocabulary_mismatch"]
