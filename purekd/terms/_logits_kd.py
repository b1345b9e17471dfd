"""The logits KD term: soft-label distillation on the adaptor's ``logits``."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from purekd import losses, schedules
from purekd.stages import Adapted, probability_shift

from ._context import Context, Term, Weight

KDLoss = Callable[..., Tensor]


def logits_mask_for(adapted_S: Adapted, adapted_T: Adapted, index: int) -> Tensor | None:
    """The row mask for the ``index``-th logits pair: the student's ``logits_mask`` if it has
    one, else the teacher's (a single mask serves every logits tensor)."""
    for masks in (adapted_S.logits_mask, adapted_T.logits_mask):
        if masks:
            return masks[index] if len(masks) > 1 else masks[0]
    return None


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

    Returns ``{}`` when either side has no logits.
    """

    def term(adapted_S: Adapted, adapted_T: Adapted, ctx: Context) -> dict[str, Tensor]:
        del ctx
        if not adapted_S.logits or not adapted_T.logits:
            return {}
        total: Tensor | None = None
        for i, (l_S, l_T) in enumerate(zip(adapted_S.logits, adapted_T.logits, strict=True)):
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

    return Term(term, weight, check)


__all__ = ["check_logits", "logits_kd", "logits_mask_for"]
