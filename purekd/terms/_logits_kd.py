"""The logits KD term: soft-label distillation on the adaptor's ``logits``."""

from __future__ import annotations

from collections.abc import Callable

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


def logits_mask_for(adapted_S: Adapted, adapted_T: Adapted, index: int) -> Tensor | None:
    """The row mask for the ``index``-th logits pair: the student's ``logits_mask`` if it has
    one, else the teacher's (a single mask serves every logits tensor)."""
    mask = _own_mask(adapted_S, index)
    return mask if mask is not None else _own_mask(adapted_T, index)


def separate_masks(adapted_S: Adapted, adapted_T: Adapted, index: int) -> bool:
    """Whether the ``index``-th logits pair is masked on each side by its own mask (two distinct
    mask tensors), so the sides' selected rows must be paired in order."""
    mask_S, mask_T = _own_mask(adapted_S, index), _own_mask(adapted_T, index)
    return mask_S is not None and mask_T is not None and mask_S is not mask_T


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


def check_logits(adapted_S: Adapted, adapted_T: Adapted, shift_probability: bool = False) -> None:
    """Teacher and student logits must pair up one to one with equal shapes."""
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
        if len(s) == 3 and separate_masks(adapted_S, adapted_T, i):
            _check_separately_masked(adapted_S, adapted_T, i, s, t)
            continue
        if s != t:
            what = "class dimension" if s[:-1] == t[:-1] else "shape"
            raise ValueError(
                f"logits[{i}] differ in {what}: student {s}, teacher {t}; the KD loss compares "
                "them entry by entry, so both must have the same shape"
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


def _check_separately_masked(adapted_S: Adapted, adapted_T: Adapted, index: int,
                             shape_S: tuple[int, ...], shape_T: tuple[int, ...]) -> None:
    mask_S, mask_T = _own_mask(adapted_S, index), _own_mask(adapted_T, index)
    assert mask_S is not None and mask_T is not None
    if shape_S[-1] != shape_T[-1]:
        raise ValueError(f"logits[{index}] differ in class dimension: student {shape_S}, "
                         f"teacher {shape_T}")
    for side, mask, shape in (("student", mask_S, shape_S), ("teacher", mask_T, shape_T)):
        if tuple(mask.shape) != shape[:-1]:
            raise ValueError(f"the {side}'s logits_mask[{index}] has shape {tuple(mask.shape)} "
                             f"but its logits[{index}] have shape {shape}")
    kept_S, kept_T = int((mask_S != 0).sum()), int((mask_T != 0).sum())
    if kept_S != kept_T:
        raise ValueError(
            f"logits[{index}]: the student's logits_mask keeps {kept_S} rows but the teacher's "
            f"keeps {kept_T}; the selected rows are paired in order, so both masks must keep "
            "the same number")


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
    * ``mask_i`` is the ``logits_mask`` (rows of 3-d logits only; 2-d logits are never masked).
      When both sides return their own mask, each side keeps its own rows and the k-th kept
      student row meets the k-th kept teacher row (:func:`align_teacher_rows`), as in TextBrewer;
      when one side returns a mask, it serves both.

    Returns ``{}`` when either side has no logits.
    """

    def term(adapted_S: Adapted, adapted_T: Adapted, ctx: Context) -> dict[str, Tensor]:
        del ctx
        if not adapted_S.logits or not adapted_T.logits:
            return {}
        total: Tensor | None = None
        for i, (l_S, l_T) in enumerate(zip(adapted_S.logits, adapted_T.logits, strict=True)):
            if l_S.dim() == 3 and separate_masks(adapted_S, adapted_T, i):
                l_T = align_teacher_rows(l_T, _own_mask(adapted_T, i), _own_mask(adapted_S, i))  # type: ignore[arg-type]
            if shift_probability:
                l_T = probability_shift(l_T, adapted_S.labels[i])
            mask = logits_mask_for(adapted_S, adapted_T, i) if l_S.dim() == 3 else None
            tau = (temperature_schedule(l_S, l_T, temperature) if mask is None
                   else temperature_schedule(l_S, l_T, temperature, mask))
            value = kd_loss(l_S, l_T, tau, mask)
            total = value if total is None else total + value
        assert total is not None
        return {name: total}

    def check(adapted_S: Adapted, adapted_T: Adapted) -> None:
        check_logits(adapted_S, adapted_T, shift_probability)

    return Term(term, weight, check, name)


__all__ = ["align_teacher_rows", "check_logits", "logits_kd", "logits_mask_for", "separate_masks"]
