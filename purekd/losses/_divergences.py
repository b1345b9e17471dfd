"""The divergence family for token-level distillation, as row functions of log-probabilities.

Each divergence :math:`D(p^T, p^S)` is given by one *row function* of the two sides'
log-probabilities ``log_p_S``, ``log_p_T`` (``(rows, V)``, float32 or float64) that returns

* the per-row value ``(rows,)``;
* on request, :math:`a^S = \\partial D / \\partial \\log p^S` and :math:`a^T` (``(rows, V)``),
  the gradient with respect to each log-probability taken as a free variable. Through a
  log-softmax :math:`\\log p = z - \\operatorname{lse}(z)` this gives the gradient for the logits
  :math:`\\partial D/\\partial z_v = a_v - p_v \\sum_u a_u` (:func:`through_log_softmax`).

The same row functions serve the dense losses below (autograd differentiates the value), the
chunked losses and the fused output-layer losses (:mod:`._blockwise` uses the closed-form
gradients, one block of rows at a time), and the top-k losses (on the teacher's support).
Terms whose probability is exactly 0 contribute 0 (``0 log 0 = 0``), so a side may hold
``-inf`` log-probabilities (an empty tail bucket).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

RowResult = tuple[Tensor, Tensor | None, Tensor | None]
RowFunction = Callable[[Tensor, Tensor, bool, bool], RowResult]


def _xlog_ratio(p: Tensor, log_x: Tensor, log_y: Tensor) -> Tensor:
    """``p (log_x - log_y)``, 0 where ``p == 0``."""
    return torch.where(p > 0, p * (log_x - log_y), 0.0)


def _guard(p: Tensor, a: Tensor) -> Tensor:
    return torch.where(p > 0, a, 0.0)


def _log_mixture(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """``log(w p + (1 - w) q)`` for ``0 < w < 1``, computed without leaving log space."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def forward_kl_rows(log_p_S: Tensor, log_p_T: Tensor, grad_S: bool = False,
                    grad_T: bool = False) -> RowResult:
    """``sum_v p_T (log p_T - log p_S)`` per row."""
    p_T = log_p_T.exp()
    value = _xlog_ratio(p_T, log_p_T, log_p_S).sum(-1)
    a_S = -p_T if grad_S else None
    a_T = _guard(p_T, p_T * (log_p_T - log_p_S + 1)) if grad_T else None
    return value, a_S, a_T


def reverse_kl_rows(log_p_S: Tensor, log_p_T: Tensor, grad_S: bool = False,
                    grad_T: bool = False) -> RowResult:
    """``sum_v p_S (log p_S - log p_T)`` per row."""
    value, a_T, a_S = forward_kl_rows(log_p_T, log_p_S, grad_T, grad_S)
    return value, a_S, a_T


def soft_cross_entropy_rows(log_p_S: Tensor, log_p_T: Tensor, grad_S: bool = False,
                            grad_T: bool = False) -> RowResult:
    """``-sum_v p_T log p_S`` per row (:func:`~purekd.losses.kd_ce`'s per-row value)."""
    p_T = log_p_T.exp()
    value = -torch.where(p_T > 0, p_T * log_p_S, 0.0).sum(-1)
    a_S = -p_T if grad_S else None
    a_T = _guard(p_T, -p_T * log_p_S) if grad_T else None
    return value, a_S, a_T


def jsd_rows(beta: float) -> RowFunction:
    """TRL's generalized JSD: ``beta KL(p_T||m) + (1-beta) KL(p_S||m)``,
    ``m = beta p_T + (1-beta) p_S``; ``beta`` 0 and 1 are exactly forward and reverse KL."""
    if beta == 0:
        return forward_kl_rows
    if beta == 1:
        return reverse_kl_rows
    return _mixture_rows(beta, scale_T=beta, scale_S=1 - beta)


def scaled_jsd_rows(beta: float) -> RowFunction:
    """The generalized JSD divided by ``beta (1-beta)``: continuous in ``beta`` on [0, 1]."""
    if beta == 0:
        return forward_kl_rows
    if beta == 1:
        return reverse_kl_rows
    return _mixture_rows(beta, scale_T=1 / (1 - beta), scale_S=1 / beta)


def _mixture_rows(beta: float, scale_T: float, scale_S: float) -> RowFunction:
    """``scale_T KL(p_T||m) + scale_S KL(p_S||m)``, ``m = beta p_T + (1-beta) p_S``.

    Its gradients: ``a_S = scale_S p_S (log p_S - log m)`` and likewise for the teacher: the
    terms from ``m``'s dependence on each side cancel because ``scale_T (1-beta) =
    scale_S beta`` for both scalings used (``beta, 1-beta`` and ``1/(1-beta), 1/beta``)."""

    def rows(log_p_S: Tensor, log_p_T: Tensor, grad_S: bool = False,
             grad_T: bool = False) -> RowResult:
        p_S, p_T = log_p_S.exp(), log_p_T.exp()
        log_m = torch.log(beta * p_T + (1 - beta) * p_S)
        kl_S = scale_S * _xlog_ratio(p_S, log_p_S, log_m)
        kl_T = scale_T * _xlog_ratio(p_T, log_p_T, log_m)
        value = (kl_T + kl_S).sum(-1)
        # d/dlog p_S of [cT KL(T||m) + cS KL(S||m)] = cS p_S (log p_S - log m + 1)
        #   - (cT p_T + cS p_S) (1-beta) p_S / m, and (cT p_T + cS p_S) (1-beta) = cS m, so the
        #   last term is cS p_S, cancelling the +1: a_S = cS p_S (log p_S - log m)
        a_S = kl_S if grad_S else None
        a_T = kl_T if grad_T else None
        return value, a_S, a_T

    return rows


def skew_forward_kl_rows(alpha: float) -> RowFunction:
    """``KL(p_T || alpha p_T + (1-alpha) p_S)`` per row."""

    def rows(log_p_S: Tensor, log_p_T: Tensor, grad_S: bool = False,
             grad_T: bool = False) -> RowResult:
        p_T = log_p_T.exp()
        log_m = _log_mixture(log_p_T, log_p_S, alpha)
        value = _xlog_ratio(p_T, log_p_T, log_m).sum(-1)
        a_S = (_guard(p_T, -(1 - alpha) * p_T * (log_p_S - log_m).exp()) if grad_S else None)
        a_T = (_guard(p_T, p_T * (log_p_T - log_m + 1 - alpha * (log_p_T - log_m).exp()))
               if grad_T else None)
        return value, a_S, a_T

    return rows


def skew_reverse_kl_rows(alpha: float) -> RowFunction:
    """``KL(p_S || alpha p_S + (1-alpha) p_T)`` per row."""
    forward = skew_forward_kl_rows(alpha)

    def rows(log_p_S: Tensor, log_p_T: Tensor, grad_S: bool = False,
             grad_T: bool = False) -> RowResult:
        value, a_T, a_S = forward(log_p_T, log_p_S, grad_T, grad_S)
        return value, a_S, a_T

    return rows


def tvd_rows(log_p_S: Tensor, log_p_T: Tensor, grad_S: bool = False,
             grad_T: bool = False) -> RowResult:
    """``1/2 sum_v |p_T - p_S|`` per row (gradient 0 where ``p_T == p_S``)."""
    p_S, p_T = log_p_S.exp(), log_p_T.exp()
    value = 0.5 * (p_T - p_S).abs().sum(-1)
    a_S = 0.5 * p_S * torch.sign(p_S - p_T) if grad_S else None
    a_T = 0.5 * p_T * torch.sign(p_T - p_S) if grad_T else None
    return value, a_S, a_T


def through_log_softmax(a: Tensor, log_p: Tensor, total: float | None = None) -> Tensor:
    """The gradient for logits ``z`` from ``a = dD/dlog p``, ``log p = log_softmax(z)``:
    ``a - p sum(a)``; ``total``: ``sum(a)`` when it is known (saves a reduction)."""
    return a - log_p.exp() * (a.sum(-1, keepdim=True) if total is None else total)


class Divergence(NamedTuple):
    """A divergence chosen by name with its parameters: ``rows`` computes it (see above)."""

    name: str
    rows: RowFunction
    key: tuple[object, ...]  # hashable identity (name and parameter values): one kernel each
    student_total: float | None = None  # sum_v a^S_v when it is a constant (-1 for the KLs)


def check_beta(beta: float, where: str) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"{where}: beta must be a number in [0, 1], got {type(beta).__name__}")
    if not 0.0 <= beta <= 1.0 or math.isnan(beta):
        raise ValueError(f"{where}: beta={beta!r} is outside [0, 1]; pass 0 <= beta <= 1 "
                         f"(0 is forward KL, 1 reverse KL)")
    return float(beta)


def check_alpha(alpha: float, where: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{where}: alpha must be a number in (0, 1), got {type(alpha).__name__}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"{where}: alpha={alpha!r} is outside (0, 1); pass 0 < alpha < 1 "
                         f"(e.g. alpha=0.1; alpha=0 would be plain KL)")
    return float(alpha)


def divergence(name: str, where: str, **params: float) -> Divergence:
    """The :class:`Divergence` called ``name`` (one of :data:`DIVERGENCES`) with its parameters
    (``beta`` for ``jsd``/``scaled_jsd``, ``alpha`` for the skew KLs), validated."""
    if name not in DIVERGENCES:
        raise ValueError(f"{where}: unknown loss={name!r}; choose one of {sorted(DIVERGENCES)}")
    allowed = DIVERGENCES[name]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TypeError(f"{where}: loss={name!r} takes no argument(s) {unknown}; its parameters "
                        f"are {list(allowed) or 'none'}")
    values = {**allowed, **params}
    if name in ("jsd", "scaled_jsd"):
        beta = check_beta(values["beta"], where)
        factory = jsd_rows if name == "jsd" else scaled_jsd_rows
        return Divergence(name, factory(beta), (name, beta))
    if name in ("skew_forward_kl", "skew_reverse_kl"):
        alpha = check_alpha(values["alpha"], where)
        skew = skew_forward_kl_rows if name == "skew_forward_kl" else skew_reverse_kl_rows
        return Divergence(name, skew(alpha), (name, alpha))
    plain = {"forward_kl": forward_kl_rows, "reverse_kl": reverse_kl_rows, "tvd": tvd_rows,
             "soft_cross_entropy": soft_cross_entropy_rows}
    # a^S = -p^T for forward KL and the soft cross-entropy: it sums to -1
    total = -1.0 if name in ("forward_kl", "soft_cross_entropy") else None
    return Divergence(name, plain[name], (name,), total)


DIVERGENCES: dict[str, dict[str, float]] = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": 0.5},
    "scaled_jsd": {"beta": 0.5},
    "skew_forward_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.1},
    "tvd": {},
    "soft_cross_entropy": {},
}
"""Each divergence's name and its parameters with their defaults."""


__all__ = ["DIVERGENCES", "Divergence", "divergence", "through_log_softmax"]
