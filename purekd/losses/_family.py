r"""The divergence family on logits: forward / reverse KL, JSD(β), skew KLs, total variation.

Every function takes ``(logits_S, logits_T, *, temperature=1.0, mask=None, reduction="mean",
shared_vocab=False)`` and returns a 0-dim tensor:

* logits ``(*rows, V)``; :math:`p^S = \operatorname{softmax}(z^S/\tau)`, :math:`p^T` likewise,
  computed in float32 at least (float64 stays float64) whatever the logits' dtype; the result
  is in that accumulation dtype;
* ``temperature`` a number > 0 or a tensor of shape ``rows``; no :math:`\tau^2` factor;
* ``mask`` 0/1 of shape ``rows``: rows with 0 take no part (applied by weighting; non-finite
  values there do not leak); all rows masked gives 0 with zero gradients;
* ``reduction="mean"`` is the mean over the rows with mask 1, ``"sum"`` their sum;
* ``shared_vocab=True`` compares on the first ``min(V_S, V_T)`` entries when the vocabularies
  differ (padded output layers); without it a mismatch is a ``ValueError``.

From :data:`~purekd.losses._logits.CHUNKED_KD_MIN_ELEMENTS` logits on, each loss is computed in
row blocks (:mod:`._blockwise`) and never holds both full softmaxes; there the temperature
carries no gradient. Below it autograd differentiates the formula (teacher logits that
require a gradient get one on both paths).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from purekd._masked import safe_divide

from . import _divergences, _logits
from ._blockwise import DenseTarget, blockwise_on_logits, default_chunk_rows
from ._checks import (
    Temperature,
    accumulation_dtype,
    check_logits_rank,
    check_mask,
    check_reduction,
    check_temperature,
    inverse_temperature,
    row_weights,
    shared_vocabulary,
)
from ._divergences import Divergence, PerRow, resolve


def divergence_loss(
    name: str,
    logits_S: Tensor,
    logits_T: Tensor,
    *,
    temperature: Temperature = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    shared_vocab: bool = False,
    chunk_rows: int | None = None,
    compile_blocks: bool = True,
    **params: float,
) -> Tensor:
    """The registered divergence called ``name`` (:func:`register_divergence`) with its
    parameters. ``chunk_rows`` forces the row-block computation with that many rows per
    block (``None``: only from :data:`CHUNKED_KD_MIN_ELEMENTS` logits on, with a block of
    about 8 Mi logits); ``compile_blocks`` compiles its block kernels."""
    where = name
    chosen = resolve(name, where, **params)
    sum_reduction = check_reduction(reduction, where)
    check_logits_rank(logits_S, where, "logits_S")
    check_logits_rank(logits_T, where, "logits_T")
    if logits_S.shape[:-1] != logits_T.shape[:-1]:
        raise ValueError(f"{where}: student logits {tuple(logits_S.shape)} and teacher logits "
                         f"{tuple(logits_T.shape)} have different rows")
    vocabulary = shared_vocabulary(logits_S.size(-1), logits_T.size(-1), shared_vocab, where)
    if logits_S.size(-1) != vocabulary:
        logits_S = logits_S[..., :vocabulary]
    if logits_T.size(-1) != vocabulary:
        logits_T = logits_T[..., :vocabulary]
    rows_shape = tuple(logits_S.shape[:-1])
    check_temperature(temperature, rows_shape, where)
    check_mask(mask, rows_shape, where)
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"{where}: chunk_rows={chunk_rows} must be >= 1")
    accumulate = accumulation_dtype(logits_S.dtype)
    rows = logits_S[..., 0].numel()
    weights = row_weights(mask, rows, accumulate, logits_S.device)
    inv_tau = inverse_temperature(temperature, rows_shape, accumulate, logits_S.device)
    if chunk_rows is None and logits_S.numel() < _logits.CHUNKED_KD_MIN_ELEMENTS:
        return _dense(chosen, logits_S.reshape(rows, vocabulary),
                      logits_T.reshape(rows, vocabulary), inv_tau, weights, sum_reduction,
                      temperature)
    return blockwise_on_logits(
        DenseTarget(chosen), logits_S.reshape(rows, vocabulary),
        (logits_T.reshape(rows, vocabulary),), inv_tau, weights,
        chunk_rows=chunk_rows or default_chunk_rows(rows, vocabulary),
        sum_reduction=sum_reduction, compile_blocks=compile_blocks)


def _dense(chosen: Divergence, logits_S: Tensor, logits_T: Tensor, inv_tau: Tensor,
           weights: Tensor, sum_reduction: bool, temperature: Temperature) -> Tensor:
    """The formula on whole ``(rows, V)`` logits, differentiated by autograd."""
    keep = (weights != 0).unsqueeze(-1)
    scale: Any = temperature
    if isinstance(temperature, Tensor):  # keep the temperature's gradient on this path
        scale = temperature.to(weights.dtype).reshape(-1, 1) if temperature.dim() > 0 else \
            temperature.to(weights.dtype)
    else:
        scale = inv_tau.new_tensor(float(temperature))
    z_S = torch.where(keep, logits_S.to(weights.dtype), 0.0) / scale
    z_T = torch.where(keep, logits_T.to(weights.dtype), 0.0) / scale
    per_row, _, _ = chosen.rows(z_S.log_softmax(-1), z_T.log_softmax(-1), False, False)
    # a row that is no distribution (a NaN, a +inf, or only -inf) on either side: NaN value and
    # NaN gradient alike (as the block kernels); a single -inf is probability 0, not an error
    broken = ~(z_S.amax(-1).isfinite() & z_T.amax(-1).isfinite())
    nan_there = torch.where(broken, float("nan"), 0.0).unsqueeze(-1)  # d poison/dz: NaN there, 0 elsewhere
    poison = torch.where(broken.unsqueeze(-1), z_S * nan_there, 0.0).sum(-1)
    per_row = torch.where(broken, 0.0, per_row) + poison
    total = (torch.where(keep.squeeze(-1), per_row, 0.0) * weights).sum()
    if sum_reduction:
        return total
    return safe_divide(total, weights.sum())


def forward_kl(logits_S: Tensor, logits_T: Tensor, *, temperature: Temperature = 1.0,
               mask: Tensor | None = None, reduction: str = "mean",
               shared_vocab: bool = False) -> Tensor:
    r"""Forward KL :math:`\sum_v p^T_v(\log p^T_v - \log p^S_v)` per row (mode-covering).

    Equals :func:`~purekd.losses.kd_ce` minus the teacher's entropy: the same gradient for the
    student. Shapes and options: see :mod:`purekd.losses` ("LLM-scale distillation")."""
    return divergence_loss("forward_kl", logits_S, logits_T, temperature=temperature, mask=mask,
                           reduction=reduction, shared_vocab=shared_vocab)


def reverse_kl(logits_S: Tensor, logits_T: Tensor, *, temperature: Temperature = 1.0,
               mask: Tensor | None = None, reduction: str = "mean",
               shared_vocab: bool = False) -> Tensor:
    r"""Reverse KL :math:`\sum_v p^S_v(\log p^S_v - \log p^T_v)` per row (mode-seeking)."""
    return divergence_loss("reverse_kl", logits_S, logits_T, temperature=temperature, mask=mask,
                           reduction=reduction, shared_vocab=shared_vocab)


def jsd(logits_S: Tensor, logits_T: Tensor, *, beta: float = 0.5,
        temperature: Temperature = 1.0, mask: Tensor | None = None, reduction: str = "mean",
        shared_vocab: bool = False) -> Tensor:
    r"""Generalized Jensen-Shannon divergence, TRL's convention (GKD):

    .. math::

        \beta\,\mathrm{KL}(p^T\|m) + (1-\beta)\,\mathrm{KL}(p^S\|m), \qquad
        m = \beta p^T + (1-\beta) p^S

    per row, with ``beta=0`` exactly :func:`forward_kl` and ``beta=1`` exactly
    :func:`reverse_kl`. ``beta`` in [0, 1]. **Discontinuous at the endpoints** (as TRL's): the
    mixture formula tends to 0 as ``beta`` tends to 0 or 1 (like ``beta KL(p^T||p^S)`` and
    ``(1-beta) KL(p^S||p^T)``), while ``beta`` = 0 and 1 themselves are the full KLs. For a
    loss continuous in ``beta`` use :func:`scaled_jsd`."""
    return divergence_loss("jsd", logits_S, logits_T, temperature=temperature, mask=mask,
                           reduction=reduction, shared_vocab=shared_vocab, beta=beta)


def scaled_jsd(logits_S: Tensor, logits_T: Tensor, *, beta: float = 0.5,
               temperature: Temperature = 1.0, mask: Tensor | None = None,
               reduction: str = "mean", shared_vocab: bool = False) -> Tensor:
    r""":func:`jsd` divided by :math:`\beta(1-\beta)`: continuous in ``beta`` on [0, 1].

    .. math::

        \frac{\mathrm{KL}(p^T\|m)}{1-\beta} + \frac{\mathrm{KL}(p^S\|m)}{\beta}, \qquad
        m = \beta p^T + (1-\beta) p^S

    whose limits at ``beta`` 0 and 1 are forward and reverse KL, the values taken there.
    At ``beta=0.5`` it is 4 × :func:`jsd`. Same options as :func:`jsd`."""
    return divergence_loss("scaled_jsd", logits_S, logits_T, temperature=temperature, mask=mask,
                           reduction=reduction, shared_vocab=shared_vocab, beta=beta)


def skew_forward_kl(logits_S: Tensor, logits_T: Tensor, *, alpha: float = 0.1,
                    temperature: Temperature = 1.0, mask: Tensor | None = None,
                    reduction: str = "mean", shared_vocab: bool = False) -> Tensor:
    r"""Skew forward KL (DistiLLM): :math:`\mathrm{KL}(p^T \| \alpha p^T + (1-\alpha) p^S)` per
    row, ``alpha`` in (0, 1); bounded by :math:`-\log\alpha`."""
    return divergence_loss("skew_forward_kl", logits_S, logits_T, temperature=temperature,
                           mask=mask, reduction=reduction, shared_vocab=shared_vocab,
                           alpha=alpha)


def skew_reverse_kl(logits_S: Tensor, logits_T: Tensor, *, alpha: float = 0.1,
                    temperature: Temperature = 1.0, mask: Tensor | None = None,
                    reduction: str = "mean", shared_vocab: bool = False) -> Tensor:
    r"""Skew reverse KL (DistiLLM): :math:`\mathrm{KL}(p^S \| \alpha p^S + (1-\alpha) p^T)` per
    row, ``alpha`` in (0, 1)."""
    return divergence_loss("skew_reverse_kl", logits_S, logits_T, temperature=temperature,
                           mask=mask, reduction=reduction, shared_vocab=shared_vocab,
                           alpha=alpha)


def tvd(logits_S: Tensor, logits_T: Tensor, *, temperature: Temperature = 1.0,
        mask: Tensor | None = None, reduction: str = "mean",
        shared_vocab: bool = False) -> Tensor:
    r"""Total variation distance :math:`\tfrac12\sum_v |p^T_v - p^S_v|` per row (in [0, 1];
    the gradient of :math:`|x|` at 0 is taken as 0)."""
    return divergence_loss("tvd", logits_S, logits_T, temperature=temperature, mask=mask,
                           reduction=reduction, shared_vocab=shared_vocab)


for _function in (forward_kl, reverse_kl, jsd, scaled_jsd, skew_forward_kl, skew_reverse_kl, tvd):
    _divergences.set_function(_function.__name__, _function)


def register_divergence(name: str, per_row: PerRow, *, defaults: Mapping[str, Any] | None = None,
                        check: Callable[..., None] | None = None, topk: bool | str = False,
                        gradient: Callable[..., Any] | None = None,
                        student_total: float | None = None) -> Callable[..., Tensor]:
    r"""Declare a token-level divergence once; from then on ``name`` works everywhere a
    built-in does.

    ``per_row(log_p_S, log_p_T, **params) -> (rows,)``: its value per row, from the two sides'
    float32 (or float64) log-softmaxes ``(rows, V)`` at the temperature; a side may hold
    ``-inf`` (probability 0). ``defaults``: ``{param: default}`` (the parameters it takes);
    ``check(**params)`` raises ``ValueError`` / ``TypeError`` naming a bad parameter (it is
    called on the defaults at once, and on every value given later). ``topk``: whether it has a
    top-k form, ``topk_<name>`` (``True``: both sides renormalised over the teacher's k ids;
    ``"support"``: the teacher renormalised, the student's full-vocabulary log-probabilities at
    those ids, as ``topk_kl``), also with ``tail`` (k+1 buckets, temperature 1).

    ``gradient`` (optional, for speed): ``gradient(log_p_S, log_p_T, grad_S, grad_T, **params)
    -> (value, a_S or None, a_T or None)`` with :math:`a = \partial D/\partial\log p` per side;
    ``student_total`` the constant :math:`\sum_v a^S_v` if there is one. Without it the
    chunked and fused forms take the gradient by ``torch.func.vjp`` of ``per_row`` inside each
    block of rows, so they still never hold ``(N, V)`` logits.

    After the call: ``DistillationConfig(kd_loss_type=name)`` (or ``[name, {param: value}]``),
    :func:`divergence` ``(name, **params)``, ``fused_linear_kd(..., loss=name)``, the top-k
    forms, token normalisation (``loss_normalisation='auto'``) and
    :func:`divergence_table` (the docs' table). Returns the dense loss with the defaults.
    """
    rows_for = None
    if gradient is not None:
        if not callable(gradient):
            raise TypeError(f"register_divergence({name!r}): gradient must be callable, got "
                            f"{type(gradient).__name__}")
        hand = gradient

        def rows_for(**params: Any) -> Any:
            return functools.partial(_row_result, hand, params)

    _divergences.declare(name, per_row, defaults=defaults, check=check, topk=topk,
                         rows_for=rows_for, student_total=student_total)
    function = _named_loss(name, {})
    _divergences.set_function(name, function)
    return function


def _row_result(gradient: Callable[..., Any], params: Mapping[str, Any], log_p_S: Tensor,
                log_p_T: Tensor, grad_S: bool = False, grad_T: bool = False) -> Any:
    return gradient(log_p_S, log_p_T, grad_S, grad_T, **params)


def unregister_divergence(name: str) -> None:
    """Remove a divergence added by :func:`register_divergence` (the built-ins stay)."""
    _divergences.unregister(name)


def _named_loss(name: str, params: Mapping[str, Any]) -> Callable[..., Tensor]:
    fixed = dict(params)

    def loss(logits_S: Tensor, logits_T: Tensor, *, temperature: Temperature = 1.0,
             mask: Tensor | None = None, reduction: str = "mean", shared_vocab: bool = False,
             **more: Any) -> Tensor:
        return divergence_loss(name, logits_S, logits_T, temperature=temperature, mask=mask,
                               reduction=reduction, shared_vocab=shared_vocab,
                               **{**fixed, **more})

    loss.__name__ = loss.__qualname__ = name
    loss.__doc__ = (f"The registered divergence {name!r} ({_divergences.declared(name, name).formula})"
                    f" per row, parameters {fixed or 'as declared'}; see "
                    ":func:`~purekd.losses.divergence`.")
    return loss


def divergence(name: str, **params: Any) -> Callable[..., Tensor]:
    """The loss ``(logits_S, logits_T, *, temperature=1.0, mask=None, reduction="mean",
    shared_vocab=False) -> 0-dim`` of the registered divergence ``name`` with ``params``
    (validated now; unknown names and parameters raise, listing the valid ones)."""
    where = f"divergence({name!r})"
    entry = _divergences.declared(name, where)
    _divergences.parameters(name, where, params)
    if not params and entry.function is not None:
        return entry.function
    return _named_loss(name, params)


def divergence_table() -> str:
    """The Markdown table of every registered divergence (the docs' table is this text)."""
    lines = ["| `kd_loss_type` | per-row value | top-k form | notes |", "| --- | --- | --- | --- |"]
    for entry in _divergences.entries():
        if not entry.listed:
            continue
        params = ", ".join(f"{k}={v!r}" for k, v in entry.defaults.items())
        name = f"`{entry.name}({params})`" if params else f"`{entry.name}`"
        topk = f"`{entry.topk_name}`" if entry.topk_name else "—"
        lines.append(f"| {name} | {entry.formula} | {topk} | {entry.notes} |")
    return "\n".join(lines) + "\n"


__all__ = ["divergence", "divergence_loss", "divergence_table", "forward_kl", "jsd",
           "register_divergence", "reverse_kl", "scaled_jsd", "skew_forward_kl",
           "skew_reverse_kl", "tvd", "unregister_divergence"]
