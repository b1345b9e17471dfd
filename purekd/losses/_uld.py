r"""``uld``: Universal Logit Distillation — sorted probabilities, no shared vocabulary needed.

ULD (Boizard et al., 2024) compares the *shapes* of two distributions over different
vocabularies: each side's probabilities sorted in decreasing order, the shorter padded with
zeros *after sorting* (padding before sorting would be the same, as zeros sort last; padding
ids with probability mass would not), then the L1 distance:

.. math::

    \operatorname{ULD}(q^S, q^T) = \sum_{i=1}^{\max(V_S, V_T)} \bigl| q^S_{(i)} - q^T_{(i)}
    \bigr|, \qquad q_{(1)} \ge q_{(2)} \ge \dots, \quad q_{(i)} = 0 \text{ for } i > V

per aligned span (``q`` the span's merged vector, :mod:`._spans`). With ``top_k=k`` only each
side's ``k`` largest entries are sorted and the rest enters through its total mass:

.. math::

    \sum_{i=1}^{k} \bigl| q^S_{(i)} - q^T_{(i)} \bigr|
    + \Bigl| \sum_{i>k} q^S_{(i)} - \sum_{i>k} q^T_{(i)} \Bigr|

— a lower bound of the full value (the triangle inequality on the tail), equal to it when
``k >= max(V_S, V_T)``; ``torch.topk`` instead of a full sort for large vocabularies.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from . import _divergences
from ._checks import Temperature
from ._family import divergence_loss, register_divergence
from ._spans import AlignedSpans, span_loss


def sorted_l1(log_q_S: Tensor, log_q_T: Tensor, top_k: int | None = None) -> Tensor:
    """The ULD distance of each row (see the module docstring). ``log_q_S`` ``(C, V_S)``,
    ``log_q_T`` ``(C, V_T)`` log-probabilities (possibly of sub-probability vectors; an empty
    vocabulary is allowed: its vector is all zeros). Returns ``(C,)``."""
    q_S, q_T = log_q_S.exp(), log_q_T.exp()
    if top_k is None:
        s = q_S.sort(dim=-1, descending=True).values
        t = q_T.sort(dim=-1, descending=True).values
        rest = None
    else:
        s = q_S.topk(min(top_k, q_S.size(-1)), dim=-1).values
        t = q_T.topk(min(top_k, q_T.size(-1)), dim=-1).values
        rest = ((q_S.sum(-1) - s.sum(-1)) - (q_T.sum(-1) - t.sum(-1))).abs()
    m = min(s.size(-1), t.size(-1))
    value = (s[:, :m] - t[:, :m]).abs().sum(-1) + s[:, m:].sum(-1) + t[:, m:].sum(-1)
    return value if rest is None else value + rest


def check_top_k(top_k: int | None, where: str | None) -> int | None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}top_k={top_k!r} must be a positive int, or None to sort "
                         f"the whole vocabulary")
    return top_k


def aligned_uld(logits_S: Tensor, logits_T: Tensor, spans: AlignedSpans, *, temperature: float = 1.0,
        top_k: int | None = None, reduction: str = "mean", chunk_spans: int | None = None,
        blockwise: bool = True) -> Tensor:
    r"""ULD over the aligned spans: :math:`\frac{1}{\sum_s w_s}\sum_s w_s
    \operatorname{ULD}(q^S_s, q^T_s)` (``reduction="mean"``, token-normalised over the aligned
    spans; ``"sum"`` without the division).

    ``logits_S`` ``(..., V_S)``, ``logits_T`` ``(..., V_T)``: any vocabularies; ``spans``:
    :class:`AlignedSpans` (from :func:`purekd.stages.align_spans`) over their flattened rows.
    ``temperature`` scales both sides' logits. ``top_k``: sort only each side's ``k`` largest
    probabilities (module docstring). Computed ``chunk_spans`` spans at a time (default: about
    8 Mi logit entries a block); ``blockwise=False`` is the plain-autograd reference. Returns a
    0-dim tensor; gradients flow into ``logits_S`` only. No span of weight 1 → 0 with zero
    gradients.
    """
    where = "aligned_uld"
    check_top_k(top_k, where)

    def per_span(log_q_S: Tensor, log_q_T: Tensor) -> Tensor:
        return sorted_l1(log_q_S, log_q_T, top_k)

    return span_loss(per_span, logits_S, logits_T, spans, temperature=temperature,
                     reduction=reduction, chunk_spans=chunk_spans, blockwise=blockwise,
                     where=where)


def _uld_per_row(log_p_S: Tensor, log_p_T: Tensor, top_k: int | None = None) -> Tensor:
    r"""\(\sum_i \lvert p^S_{(i)} - p^T_{(i)}\rvert\), each side sorted in decreasing order"""
    return sorted_l1(log_p_S, log_p_T, top_k)


def _check_uld(top_k: int | None = None) -> None:
    check_top_k(top_k, None)


def uld(logits_S: Tensor, logits_T: Tensor, *, temperature: Temperature = 1.0,
        mask: Tensor | None = None, reduction: str = "mean", shared_vocab: bool = False,
        top_k: int | None = None) -> Tensor:
    r"""``kd_loss_type="uld"``: the sorted-probability L1 of row ``t`` against row ``t``,
    :math:`\sum_i |p^S_{(i)} - p^T_{(i)}|` (one tokenizer on both sides, like the other
    divergences of the family; shapes and options: :mod:`purekd.losses`). Two tokenizers need
    the aligned spans: :func:`aligned_uld`."""
    params: dict[str, Any] = {} if top_k is None else {"top_k": top_k}
    return divergence_loss("uld", logits_S, logits_T, temperature=temperature, mask=mask,
                           reduction=reduction, shared_vocab=shared_vocab, **params)


# registered once: DistillationConfig(kd_loss_type="uld"), the chunked and fused forms, the docs
register_divergence("uld", _uld_per_row, defaults={"top_k": None}, check=_check_uld)
_divergences.set_function("uld", uld)

__all__ = ["aligned_uld", "sorted_l1", "uld"]
