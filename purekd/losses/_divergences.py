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

import dataclasses
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

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
    key: tuple[object, ...]  # hashable identity (name, declaration, parameters): one kernel each
    student_total: float | None = None  # sum_v a^S_v when it is a constant (-1 for the KLs)


def _prefix(where: str | None) -> str:
    return f"{where}: " if where else ""


def check_beta(beta: float, where: str | None = None) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"{_prefix(where)}beta must be a number in [0, 1], got {type(beta).__name__}")
    if not 0.0 <= beta <= 1.0 or math.isnan(beta):
        raise ValueError(f"{_prefix(where)}beta={beta!r} is outside [0, 1]: beta must be in [0, 1] "
                         f"(0 is forward KL, 1 reverse KL)")
    return float(beta)


def check_alpha(alpha: float, where: str | None = None) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{_prefix(where)}alpha must be a number in (0, 1), got {type(alpha).__name__}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"{_prefix(where)}alpha={alpha!r} is outside (0, 1): alpha must be in (0, 1) "
                         f"(e.g. alpha=0.1; alpha=0 would be plain KL)")
    return float(alpha)


# ------------------------------------------------------------------------------ registry
PerRow = Callable[..., Tensor]
"""``per_row(log_p_S, log_p_T, **params) -> (rows,)``: a divergence's value per row."""

TOPK_MODES_OF = ("support", "renormalised")
"""The top-k forms a divergence may declare: ``"support"`` (the teacher renormalised over its k
ids, the student's full-vocabulary log-probabilities there: forward KL's ``topk_kl``) or
``"renormalised"`` (both sides renormalised over the k ids)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Declared:
    """One registered divergence: everything the dense, chunked, fused and top-k forms, the
    configs, the token normalisation and the docs need to know about it."""

    name: str
    per_row: PerRow
    defaults: Mapping[str, Any]
    check: Callable[..., None] | None
    topk: str | None  # None (no top-k form), "support" or "renormalised"
    topk_name: str | None  # the top-k form's loss name, e.g. "topk_kl"
    rows_for: Callable[..., RowFunction] | None  # params -> hand-written RowFunction, or None
    student_total: float | None
    formula: str  # for the docs' table (Markdown with MathJax)
    notes: str
    listed: bool  # a kd_loss_type name (False: internal, e.g. kd_ce's soft cross-entropy)
    builtin: bool
    function: Callable[..., Tensor] | None = None  # the dense loss with the defaults


_REGISTRY: dict[str, Declared] = {}


def _autograd_rows(per_row: PerRow, params: Mapping[str, Any]) -> RowFunction:
    """A :data:`RowFunction` whose ``a^S``, ``a^T`` come from ``torch.func.vjp`` of ``per_row``
    on the block it is given (so the fused and chunked forms still hold one block at a time)."""

    def rows(log_p_S: Tensor, log_p_T: Tensor, grad_S: bool = False,
             grad_T: bool = False) -> RowResult:
        if not (grad_S or grad_T):
            return per_row(log_p_S, log_p_T, **params), None, None
        if grad_S and grad_T:
            value, pull = torch.func.vjp(  # type: ignore[misc]
                lambda s, t: per_row(s, t, **params), log_p_S, log_p_T)
            a_S, a_T = pull(torch.ones_like(value))
            return value, a_S, a_T
        if grad_S:
            value, pull = torch.func.vjp(  # type: ignore[misc]
                lambda s: per_row(s, log_p_T, **params), log_p_S)
            return value, pull(torch.ones_like(value))[0], None
        value, pull = torch.func.vjp(  # type: ignore[misc]
            lambda t: per_row(log_p_S, t, **params), log_p_T)
        return value, None, pull(torch.ones_like(value))[0]

    return rows


def _hashable(value: Any) -> object:
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def declare(name: str, per_row: PerRow | None = None, *, defaults: Mapping[str, Any] | None = None,
            check: Callable[..., None] | None = None, topk: bool | str = False,
            topk_name: str | None = None, rows_for: Callable[..., RowFunction] | None = None,
            student_total: float | None = None, formula: str | None = None, notes: str = "",
            listed: bool = True, builtin: bool = False,
            function: Callable[..., Tensor] | None = None) -> Declared:
    """Record a divergence (see :func:`~purekd.losses.register_divergence`, the public entry;
    the built-ins also give ``rows_for``, their hand-written gradients)."""
    where = f"register_divergence({name!r})"
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{where}: the name must be a Python identifier, e.g. 'hellinger'")
    if name in _REGISTRY:
        raise ValueError(f"{where}: {name!r} is already registered; choose another name (or "
                         f"unregister_divergence({name!r}) first)")
    if per_row is None and rows_for is None:
        raise TypeError(f"{where}: give per_row(log_p_S, log_p_T, **params) -> (rows,)")
    if per_row is not None and not callable(per_row):
        raise TypeError(f"{where}: per_row must be callable, got {type(per_row).__name__}")
    if check is not None and not callable(check):
        raise TypeError(f"{where}: check must be callable or None, got {type(check).__name__}")
    defaults = dict(defaults or {})
    for param in defaults:
        if not isinstance(param, str) or not param.isidentifier() or param == "tail":
            raise ValueError(f"{where}: parameter {param!r} must be an identifier other than "
                             f"'tail' (the top-k form's own option)")
    mode = {True: "renormalised", False: None}.get(topk, topk) if isinstance(topk, bool) else topk
    if mode is not None and mode not in TOPK_MODES_OF:
        raise ValueError(f"{where}: topk={topk!r}; use False, True (both sides renormalised "
                         f"over the teacher's k ids) or one of {list(TOPK_MODES_OF)}")
    if per_row is None:
        assert rows_for is not None
        hand = rows_for

        def per_row(log_p_S: Tensor, log_p_T: Tensor, **params: Any) -> Tensor:
            return hand(**params)(log_p_S, log_p_T, False, False)[0]

    if check is not None:
        check(**defaults)  # the defaults themselves must pass
    doc = (per_row.__doc__ or "").strip().splitlines()
    entry = Declared(
        name=name, per_row=per_row, defaults=MappingProxyType(defaults), check=check,
        topk=mode, topk_name=(topk_name or f"topk_{name}") if mode else None, rows_for=rows_for,
        student_total=student_total, formula=formula or (doc[0] if doc else "(see its code)"),
        notes=notes, listed=listed, builtin=builtin, function=function)
    clash = [e.name for e in _REGISTRY.values() if entry.topk_name and e.topk_name ==
             entry.topk_name]
    if clash:
        raise ValueError(f"{where}: its top-k form {entry.topk_name!r} is {clash[0]!r}'s already")
    _REGISTRY[name] = entry
    return entry


def set_function(name: str, function: Callable[..., Tensor]) -> None:
    """Attach ``name``'s dense loss function (done once, by the module that builds it)."""
    _REGISTRY[name] = dataclasses.replace(_REGISTRY[name], function=function)


def unregister(name: str) -> None:
    """Remove a divergence registered with ``register_divergence`` (built-ins stay)."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unregister_divergence: {name!r} is not registered; registered: "
                         f"{sorted(_REGISTRY)}")
    if entry.builtin:
        raise ValueError(f"unregister_divergence: {name!r} is a built-in divergence")
    del _REGISTRY[name]


def declared(name: str, where: str) -> Declared:
    """The declaration of ``name``; a ``ValueError`` listing the names otherwise."""
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"{where}: unknown loss={name!r}; choose one of {names()}")
    return entry


def names(*, listed_only: bool = True) -> list[str]:
    """The registered divergences' names, sorted (``listed_only``: the ``kd_loss_type`` ones)."""
    return sorted(n for n, e in _REGISTRY.items() if e.listed or not listed_only)


def entries() -> list[Declared]:
    """Every declaration, in registration order."""
    return list(_REGISTRY.values())


def parameters(name: str, where: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``name``'s parameters: its defaults updated by ``params``, validated by its check."""
    entry = declared(name, where)
    unknown = sorted(set(params) - set(entry.defaults))
    if unknown:
        raise TypeError(f"{where}: loss={name!r} takes no argument(s) {unknown}; its parameters "
                        f"are {list(entry.defaults) or 'none'}")
    values = {**entry.defaults, **params}
    if entry.check is not None:
        try:
            entry.check(**values)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{where}: {error}") from None
    return values


def resolve(name: str, where: str, **params: Any) -> Divergence:
    """The :class:`Divergence` called ``name`` with its parameters, validated."""
    entry = declared(name, where)
    values = parameters(name, where, params)
    rows = (entry.rows_for(**values) if entry.rows_for is not None
            else _autograd_rows(entry.per_row, values))
    key = (name, entry.rows_for or entry.per_row,
           *((k, _hashable(v)) for k, v in sorted(values.items())))
    return Divergence(name, rows, key, entry.student_total)


def topk_forms() -> dict[str, str]:
    """``{divergence name: its top-k form's name}`` for those with a top-k form."""
    return {e.name: e.topk_name for e in _REGISTRY.values() if e.topk_name}


# ------------------------------------------------------------------------------ built-ins
def _beta(beta: float) -> None:
    check_beta(beta)


def _alpha(alpha: float) -> None:
    check_alpha(alpha)


def _plain(rows: RowFunction) -> Callable[..., RowFunction]:
    return lambda: rows


declare("forward_kl", rows_for=_plain(forward_kl_rows), topk="support", topk_name="topk_kl",
        student_total=-1.0, builtin=True,
        formula=r"\(\sum_v p^T_v(\log p^T_v - \log p^S_v)\)",
        notes="mode-covering; the student's gradient equals `kd_ce`'s")
declare("reverse_kl", rows_for=_plain(reverse_kl_rows), topk=True, topk_name="topk_reverse_kl",
        builtin=True, formula=r"\(\sum_v p^S_v(\log p^S_v - \log p^T_v)\)",
        notes="mode-seeking")
declare("jsd", rows_for=jsd_rows, defaults={"beta": 0.5}, check=_beta, topk=True,
        topk_name="topk_jsd", builtin=True,
        formula=r"\(\beta\,\mathrm{KL}(p^T\|m) + (1-\beta)\,\mathrm{KL}(p^S\|m)\), "
                r"\(m = \beta p^T + (1-\beta)p^S\)",
        notes="TRL's generalized JSD (GKD); `beta` in [0, 1]; `beta=0` is exactly `forward_kl`, "
              "`beta=1` exactly `reverse_kl`")
declare("scaled_jsd", rows_for=scaled_jsd_rows, defaults={"beta": 0.5}, check=_beta,
        builtin=True,
        formula=r"\(\dfrac{\mathrm{KL}(p^T\|m)}{1-\beta} + \dfrac{\mathrm{KL}(p^S\|m)}{\beta}\) "
                r"= `jsd` / \(\beta(1-\beta)\)",
        notes="continuous in `beta` on [0, 1]; 4 × `jsd` at 0.5")
declare("skew_forward_kl", rows_for=skew_forward_kl_rows, defaults={"alpha": 0.1}, check=_alpha,
        builtin=True, formula=r"\(\mathrm{KL}(p^T \| \alpha p^T + (1-\alpha) p^S)\)",
        notes="DistiLLM; `alpha` in (0, 1); at most \\(-\\log\\alpha\\)")
declare("skew_reverse_kl", rows_for=skew_reverse_kl_rows, defaults={"alpha": 0.1}, check=_alpha,
        builtin=True, formula=r"\(\mathrm{KL}(p^S \| \alpha p^S + (1-\alpha) p^T)\)",
        notes="DistiLLM; `alpha` in (0, 1)")
declare("tvd", rows_for=_plain(tvd_rows), builtin=True,
        formula=r"\(\tfrac12\sum_v \lvert p^T_v - p^S_v\rvert\)",
        notes="in [0, 1]; the gradient of \\(\\lvert x\\rvert\\) at 0 is 0")
declare("soft_cross_entropy", rows_for=_plain(soft_cross_entropy_rows), student_total=-1.0,
        builtin=True, listed=False, formula=r"\(-\sum_v p^T_v \log p^S_v\)",
        notes="`kd_ce`'s per-row value (its chunked form); not a `kd_loss_type` name")


__all__ = ["Declared", "Divergence", "declare", "declared", "entries", "names", "parameters",
           "resolve", "set_function", "through_log_softmax", "topk_forms", "unregister"]
