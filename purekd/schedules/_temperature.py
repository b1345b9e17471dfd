"""Temperature schedules: ``(logits_S, logits_T, base_temperature, mask=None) -> temperature``.

A schedule returns either the base temperature (a float) or one temperature per row, a tensor
of shape ``logits.shape[:-1]``. No gradient flows through a temperature: the logits are
detached first. ``mask`` (0/1, shape ``logits.shape[:-1]``) restricts the batch statistics to
the rows that take part in the loss, as TextBrewer's ``logits_mask`` selection does.

``flsw`` and ``cwsm`` are from "Preparing Lessons: Improve Knowledge Distillation with Better
Supervision" (arXiv:1911.07471).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from purekd._masked import as_weights, weighted_mean

Temperature = float | Tensor
TemperatureSchedule = Callable[..., Temperature]


def _row_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    return values.mean() if mask is None else weighted_mean(values, as_weights(mask, values))


def constant(
    logits_S: Tensor, logits_T: Tensor, base_temperature: float, mask: Tensor | None = None
) -> float:
    """The base temperature, unchanged."""
    del logits_S, logits_T, mask
    return base_temperature


def _check_number(schedule: str, name: str, value: object, positive: bool = False) -> None:
    """A schedule's parameter: a finite real number (``positive``: > 0), checked when the
    schedule is built, so a config with ``['flsw', 'x', 2]`` fails at construction."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{schedule}: {name}={value!r} must be a number, e.g. "
                        f"['flsw', 1.0, 2.0] or ['cwsm', 1.0]")
    if not math.isfinite(value) or (positive and not value > 0):
        raise ValueError(f"{schedule}: {name}={value!r} must be a finite number"
                         f"{' > 0' if positive else ''}")


def flsw(beta: float, gamma: float, eps: float = 1e-4) -> TemperatureSchedule:
    r"""Focal-loss-style weighted temperature.

    .. math::

        v_r = \frac{z^S_r}{\lVert z^S_r\rVert + \epsilon},\quad
        t_r = \frac{z^T_r}{\lVert z^T_r\rVert + \epsilon},\quad
        w_r = (1 - v_r\cdot t_r)^\gamma,\quad
        \tau_r = \tau_0 + \beta\,(\bar w - w_r)

    where :math:`\bar w` is the mean of :math:`w` over the (unmasked) rows. Rows on which the
    student already agrees with the teacher get a higher temperature. ``beta``, ``gamma`` and
    ``eps`` are finite real numbers (``eps`` > 0); anything else raises at once.
    """
    _check_number("flsw", "beta", beta)
    _check_number("flsw", "gamma", gamma)
    _check_number("flsw", "eps", eps, positive=True)

    def flsw_schedule(
        logits_S: Tensor, logits_T: Tensor, base_temperature: float, mask: Tensor | None = None
    ) -> Tensor:
        with torch.no_grad():
            v = logits_S.detach()
            t = logits_T.detach()
            v = v / (torch.linalg.vector_norm(v, dim=-1, keepdim=True) + eps)
            t = t / (torch.linalg.vector_norm(t, dim=-1, keepdim=True) + eps)
            w = torch.pow(1 - (v * t).sum(dim=-1), gamma)
            return base_temperature + (_row_mean(w, mask) - w) * beta

    flsw_schedule.__qualname__ = f"flsw({beta!r}, {gamma!r}, eps={eps!r})"
    return flsw_schedule


def cwsm(beta: float) -> TemperatureSchedule:
    r"""Confidence-weighted temperature from the student's softmax maximum.

    .. math::

        w_r = \frac{1}{\max_c \operatorname{softmax}(z^S_r)_c + 10^{-3}},\quad
        \tau_r = \tau_0 + \beta\,(\bar w - w_r)

    ``beta`` is a finite real number; anything else raises at once.
    """
    _check_number("cwsm", "beta", beta)

    def cwsm_schedule(
        logits_S: Tensor, logits_T: Tensor, base_temperature: float, mask: Tensor | None = None
    ) -> Tensor:
        del logits_T
        with torch.no_grad():
            v = torch.softmax(logits_S.detach(), dim=-1)
            w = 1 / (v.amax(dim=-1) + 1e-3)
            return base_temperature + (_row_mean(w, mask) - w) * beta

    cwsm_schedule.__qualname__ = f"cwsm({beta!r})"
    return cwsm_schedule


__all__ = ["Temperature", "TemperatureSchedule", "constant", "cwsm", "flsw"]
