r"""Distillation from the teacher's top-k: forward KL, reverse KL and JSD on its support.

A top-k teacher cache stores, per token, the ids ``ids_T`` ``(*rows, k)`` of the teacher's k
most likely tokens and their log-probabilities ``logprobs_T`` ``(*rows, k)`` (log-softmax at
temperature 1). The student's logits are ``(*rows, V)``. With :math:`S` the k ids of a row,
:math:`q_i = \exp(\text{logprobs}_i)` and :math:`p = \operatorname{softmax}(z^S/\tau)`:

* ``tail=False`` — the teacher renormalised over its k entries at the temperature,
  :math:`\hat q_i = q_i^{1/\tau} / \sum_{j\in S} q_j^{1/\tau}`;
* ``tail=True`` — k+1 buckets: the k entries and one holding each side's remaining mass,
  :math:`1 - \sum_{i\in S} q_i` and :math:`1 - \sum_{i \in S} p_i` (computed as the
  log-sum-exp over the ids outside :math:`S`, without cancellation); only at temperature 1,
  since the teacher's mass outside its top-k cannot be re-tempered.

With k = V (every id once) every mode equals its dense loss. See each function for its bias.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._blockwise import TopkTarget, blockwise_on_logits, default_chunk_rows
from ._checks import (
    Temperature,
    accumulation_dtype,
    check_logits_rank,
    check_mask,
    check_reduction,
    check_temperature,
    inverse_temperature,
    row_weights,
)
from ._divergences import declared, resolve, topk_forms


def topk_losses() -> dict[str, str]:
    """Each top-k loss (``topk_kl``, ...; those of registered divergences declared with
    ``topk``) and the divergence it takes on the teacher's support."""
    return {form: name for name, form in topk_forms().items()}


def topk_target(loss: str, tail: bool, where: str, **params: float) -> TopkTarget:
    """The block target of the top-k loss called ``loss`` (one of :func:`topk_losses`)."""
    losses = topk_losses()
    if loss not in losses:
        raise ValueError(f"{where}: unknown top-k loss={loss!r}; choose one of "
                         f"{sorted(losses)}")
    if not isinstance(tail, bool):
        raise TypeError(f"{where}: tail must be True or False, got {tail!r}")
    name = losses[loss]
    chosen = resolve(name, where, **params)
    mode = "tail" if tail else declared(name, where).topk
    assert mode is not None
    return TopkTarget(chosen, mode)


def check_topk(ids_T: Tensor, logprobs_T: Tensor, rows_shape: tuple[int, ...], vocabulary: int,
               weights: Tensor, tail: bool, temperature: Temperature, where: str) -> None:
    """Shapes, dtypes, the ids' range (on the rows kept; skipped inside a compiled region) and
    the temperature of the tail mode."""
    if ids_T.dtype.is_floating_point or ids_T.dtype == torch.bool or ids_T.is_complex():
        raise TypeError(f"{where}: ids_T must be an integer tensor, got {ids_T.dtype}")
    if tuple(ids_T.shape) != tuple(logprobs_T.shape):
        raise ValueError(f"{where}: ids_T {tuple(ids_T.shape)} and logprobs_T "
                         f"{tuple(logprobs_T.shape)} must have the same shape (*rows, k)")
    if tuple(ids_T.shape[:-1]) != rows_shape:
        raise ValueError(f"{where}: ids_T {tuple(ids_T.shape)} must have the student's rows "
                         f"{rows_shape} and a last dimension k")
    k = ids_T.size(-1)
    if not 1 <= k <= vocabulary:
        raise ValueError(f"{where}: k={k} top-k entries per row must be between 1 and the "
                         f"vocabulary size {vocabulary}")
    if tail:
        if isinstance(temperature, Tensor):
            uniform = torch.compiler.is_compiling() or bool((temperature == 1).all())
        else:
            uniform = temperature == 1
        if not uniform:
            raise ValueError(f"{where}: tail=True needs temperature=1 (the teacher's mass "
                             f"outside its top-k cannot be re-tempered), got temperature="
                             f"{temperature!r}; use tail=False to re-temper")
    if torch.compiler.is_compiling():
        return
    kept = (weights != 0).reshape(*rows_shape, 1).to(ids_T.device)
    wide = ids_T.long()  # a cache's narrow ids (uint16) do not support comparisons
    outside = ((wide < 0) | (wide >= vocabulary)) & kept
    if bool(outside.any()):
        bad = wide[outside]
        raise ValueError(f"{where}: ids_T holds ids outside the student's vocabulary "
                         f"[0, {vocabulary}) (e.g. {bad[0].item()}, min {bad.min().item()}, "
                         f"max {bad.max().item()}); a cache for another vocabulary?")
    check_topk_distribution(wide, logprobs_T, kept.squeeze(-1), where)


def _first_row(bad: Tensor) -> str:
    index = [int(i) for i in bad.nonzero()[0]]
    return f"row {index[0]}" if len(index) == 1 else f"row {tuple(index)}"


def check_topk_distribution(ids: Tensor, logprobs: Tensor, kept: Tensor, where: str) -> None:
    """On the kept rows (``kept`` ``rows``, bool): no id twice in a row, log-probabilities that
    are no NaN and at most 0 (beyond rounding), probabilities summing to at most 1 (beyond
    rounding: ``4 eps`` of the log-probabilities' dtype, at least 1e-3). One host sync."""
    tolerance = max(1e-3, 4 * torch.finfo(logprobs.dtype).eps)
    values = logprobs.detach().float()
    ordered = ids.sort(-1).values
    twice = (ordered[..., 1:] == ordered[..., :-1]).any(-1) & kept
    wrong = (values.isnan() | (values > tolerance)).any(-1) & kept
    total = torch.where(values.isnan(), 0.0, values.exp()).sum(-1)
    heavy = (total > 1 + tolerance) & kept
    found = torch.stack([twice.any(), wrong.any(), heavy.any()]).tolist()
    if found[0]:
        row = _first_row(twice)
        raise ValueError(f"{where}: ids_T holds an id twice in {row}; a top-k row lists k "
                         f"different ids (a cache written with duplicates, or ids and "
                         f"log-probabilities misaligned?)")
    if found[1]:
        row = _first_row(wrong)
        raise ValueError(f"{where}: logprobs_T in {row} holds NaN, +inf or a positive "
                         f"log-probability (max {values[wrong].max().item()!r}); logprobs_T must "
                         f"be the teacher's log-softmax at temperature 1 (<= 0), not its logits")
    if found[2]:
        row = _first_row(heavy)
        raise ValueError(f"{where}: logprobs_T: the probabilities in {row} sum to "
                         f"{total[heavy][0].item():.4g} > 1; logprobs_T must be the teacher's "
                         f"log-softmax at temperature 1 over the whole vocabulary, not its logits "
                         f"or a softmax over the k entries alone")


def topk_loss(loss: str, logits_S: Tensor, ids_T: Tensor, logprobs_T: Tensor, *,
              tail: bool = False, temperature: Temperature = 1.0, mask: Tensor | None = None,
              reduction: str = "mean", chunk_rows: int | None = None,
              compile_blocks: bool = True, **params: float) -> Tensor:
    """The top-k loss called ``loss`` on logits; always computed in row blocks (no full
    student softmax is kept for the backward pass). ``chunk_rows``: rows per block (default:
    about 8 Mi logits); ``compile_blocks`` compiles the block kernels."""
    where = loss
    target = topk_target(loss, tail, where, **params)
    sum_reduction = check_reduction(reduction, where)
    check_logits_rank(logits_S, where, "logits_S")
    rows_shape = tuple(logits_S.shape[:-1])
    vocabulary = logits_S.size(-1)
    check_temperature(temperature, rows_shape, where)
    check_mask(mask, rows_shape, where)
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"{where}: chunk_rows={chunk_rows} must be >= 1")
    accumulate = accumulation_dtype(logits_S.dtype)
    rows = logits_S[..., 0].numel()
    weights = row_weights(mask, rows, accumulate, logits_S.device)
    check_topk(ids_T, logprobs_T, rows_shape, vocabulary, weights, tail, temperature, where)
    inv_tau = inverse_temperature(temperature, rows_shape, accumulate, logits_S.device)
    k = ids_T.size(-1)
    return blockwise_on_logits(
        target, logits_S.reshape(rows, vocabulary),
        (ids_T.detach().reshape(rows, k).long(), logprobs_T.detach().reshape(rows, k)),
        inv_tau, weights, chunk_rows=chunk_rows or default_chunk_rows(rows, vocabulary),
        sum_reduction=sum_reduction, compile_blocks=compile_blocks)


def topk_kl(logits_S: Tensor, ids_T: Tensor, logprobs_T: Tensor, *, tail: bool = False,
            temperature: Temperature = 1.0, mask: Tensor | None = None,
            reduction: str = "mean") -> Tensor:
    r"""Forward KL on the teacher's top-k support, per row:

    * ``tail=False``: :math:`\sum_{i\in S} \hat q_i(\log \hat q_i - \log p_i)` — the
      renormalised teacher against the student's full-vocabulary log-probabilities. Bias: the
      teacher's mass outside :math:`S` is given to its top-k (sharper than the true teacher),
      and the student is pushed to put all its mass on :math:`S` (its mass outside only adds
      to the loss).
    * ``tail=True``: KL over k+1 buckets (the k ids, and the rest of each side). Bias: the
      teacher's tail is matched in total only, not in shape; at temperature 1 only.

    Logits ``(*rows, V)``, ids/logprobs ``(*rows, k)``; mask, reduction as the dense losses."""
    return topk_loss("topk_kl", logits_S, ids_T, logprobs_T, tail=tail,
                     temperature=temperature, mask=mask, reduction=reduction)


def topk_reverse_kl(logits_S: Tensor, ids_T: Tensor, logprobs_T: Tensor, *,
                    tail: bool = False, temperature: Temperature = 1.0,
                    mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    r"""Reverse KL on the teacher's top-k support, per row:

    * ``tail=False``: :math:`\mathrm{KL}(\hat p\|\hat q)` with the student renormalised over
      :math:`S` too, :math:`\hat p = \operatorname{softmax}(z^S_S/\tau)`. Bias: the student's
      mass outside :math:`S` is invisible (neither penalised nor rewarded); only the shape of
      its distribution on :math:`S` is trained.
    * ``tail=True``: reverse KL over the k+1 buckets (temperature 1). Bias: the tails are
      compared in total only.
    """
    return topk_loss("topk_reverse_kl", logits_S, ids_T, logprobs_T, tail=tail,
                     temperature=temperature, mask=mask, reduction=reduction)


def topk_jsd(logits_S: Tensor, ids_T: Tensor, logprobs_T: Tensor, *, beta: float = 0.5,
             tail: bool = False, temperature: Temperature = 1.0, mask: Tensor | None = None,
             reduction: str = "mean") -> Tensor:
    r"""Generalized JSD(β) (TRL's convention, as :func:`~purekd.losses.jsd`) on the teacher's
    top-k support, per row: between the renormalised student and teacher on :math:`S`
    (``tail=False``; the student's mass outside :math:`S` is invisible, as in
    :func:`topk_reverse_kl`), or over the k+1 buckets (``tail=True``, temperature 1)."""
    return topk_loss("topk_jsd", logits_S, ids_T, logprobs_T, tail=tail,
                     temperature=temperature, mask=mask, reduction=reduction, beta=beta)


__all__ = ["check_topk", "check_topk_distribution", "topk_jsd", "topk_kl", "topk_loss",
           "topk_losses", "topk_reverse_kl"]
