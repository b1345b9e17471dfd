r"""Distillation losses from hidden states and output-layer weights, never holding the logits.

For language models the output layer's ``(N, V)`` logits dominate the memory of distillation
(N tokens × a vocabulary of 32k–256k). These functions take what the logits are made of —
the student's last hidden states ``hidden_S`` ``(*rows, H_S)`` and its output layer
``weight_S`` ``(V, H_S)`` (``bias_S`` ``(V,)``), and the teacher's side — and compute

.. math::

    \text{loss}(h^S W_S^\top + b_S,\ h^T W_T^\top + b_T)

in blocks of rows: each block's logits are formed in float32 (float64 stays float64; bf16 /
fp16 weights are never used to round logits), the block kernel gives the loss and its gradient
for those logits, which goes at once into the gradients for ``hidden_S``, ``weight_S`` and
``bias_S`` (four GEMMs a block: both logits, the two gradients). Neither model's ``(N, V)``
logits exist, in forward or backward; the extra memory is ``(V, H_S)`` and ``(N, H_S)``
gradients (float32) and a few ``(chunk_rows, V)`` blocks. The teacher gets no gradient.
The block size changes nothing beyond float rounding.

The teacher's side is pluggable: :class:`DenseTeacher` (hidden states and output weights: the
divergence family) or :class:`TopkTeacher` (a top-k cache: the top-k losses).
:func:`fused_linear_distill` also adds the student's hard-label cross-entropy in the same pass
and returns both values for logging; :func:`fused_linear_kd` and :func:`fused_linear_topk_kl`
return the distillation loss alone.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._blockwise import (
    DenseTarget,
    FusedOptions,
    Teacher,
    TopkTarget,
    default_chunk_rows,
    fused_linear,
)
from ._checks import (
    Temperature,
    accumulation_dtype,
    check_mask,
    check_reduction,
    check_temperature,
    inverse_temperature,
    row_weights,
    shared_vocabulary,
)
from ._divergences import resolve
from ._topk import check_topk, topk_target


class DenseTeacher(NamedTuple):
    """The teacher's last hidden states ``(*rows, H_T)`` and output layer ``(V_T, H_T)``
    (and bias ``(V_T,)``)."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None


class TopkTeacher(NamedTuple):
    """The teacher's top-k per row: ``ids`` ``(*rows, k)`` and ``logprobs`` ``(*rows, k)``
    (log-softmax at temperature 1), e.g. from a top-k teacher cache."""

    ids: Tensor
    logprobs: Tensor


class FusedLoss(NamedTuple):
    """``loss = kd_weight * kd + ce_weight * ce`` (0-dim, with gradients), and ``kd`` and ``ce``
    (0-dim, detached: for logging; ``ce`` is 0 without labels)."""

    loss: Tensor
    kd: Tensor
    ce: Tensor


def _check_width(hidden: Tensor, weight: Tensor, who: str, where: str) -> None:
    if weight.dim() != 2 or hidden.size(-1) != weight.size(1):
        raise ValueError(f"{where}: hidden_{who} of width {hidden.size(-1)} "
                         f"{tuple(hidden.shape)} and weight_{who} {tuple(weight.shape)} disagree; "
                         f"weight_{who} must be the output layer's (V, {hidden.size(-1)}) matrix")


def _check_bias(bias: Tensor | None, vocabulary: int, who: str, where: str) -> None:
    if bias is not None and tuple(bias.shape) != (vocabulary,):
        raise ValueError(f"{where}: bias_{who} {tuple(bias.shape)} must be ({vocabulary},), one "
                         f"entry per row of weight_{who}")


def _is_one(temperature: Temperature) -> bool:
    return not isinstance(temperature, Tensor) and float(temperature) == 1.0


def _dense_teacher(teacher: DenseTeacher, loss: str | None, loss_args: dict[str, Any],
                   hidden_S: Tensor, vocabulary: int, accumulate: torch.dtype,
                   where: str) -> tuple[DenseTarget | TopkTarget, Teacher]:
    """The block target and the teacher's side for a dense teacher, checked."""
    _check_width(teacher.hidden, teacher.weight, "T", where)
    _check_bias(teacher.bias, teacher.weight.size(0), "T", where)
    if tuple(teacher.hidden.shape[:-1]) != tuple(hidden_S.shape[:-1]):
        raise ValueError(f"{where}: hidden_S {tuple(hidden_S.shape)} and hidden_T "
                         f"{tuple(teacher.hidden.shape)} have different rows (N); pass the "
                         f"same tokens for both models")
    target = DenseTarget(resolve(loss or "forward_kl", where, **loss_args))
    with torch.no_grad():
        weight = teacher.weight.detach()[:vocabulary].to(accumulate)
        bias = None if teacher.bias is None else teacher.bias.detach()[:vocabulary].to(accumulate)
    rows = teacher.hidden[..., 0].numel()
    return target, Teacher("dense", (teacher.hidden.detach().reshape(rows, -1), weight, bias))


def _topk_teacher(teacher: TopkTeacher, loss: str | None, loss_args: dict[str, Any],
                  rows_shape: tuple[int, ...], vocabulary: int, weights: Tensor,
                  temperature: Temperature, where: str) -> tuple[DenseTarget | TopkTarget, Teacher]:
    """The block target and the teacher's side for a top-k teacher, checked."""
    args = dict(loss_args)
    tail = bool(args.pop("tail", False))
    target = topk_target(loss or "topk_kl", tail, where, **args)
    check_topk(teacher.ids, teacher.logprobs, rows_shape, vocabulary, weights, tail,
               temperature, where)
    rows, k = weights.numel(), teacher.ids.size(-1)
    return target, Teacher("topk", (teacher.ids.detach().reshape(rows, k).long(),
                                    teacher.logprobs.detach().reshape(rows, k)))


def _flat_labels(labels: Tensor, rows: int, vocabulary: int, ignore_index: int,
                 where: str) -> Tensor:
    """``labels`` as ``(rows,)`` int64; ids outside the vocabulary raise (eagerly)."""
    flat = labels.detach().reshape(rows).long()
    if not torch.compiler.is_compiling():
        valid = flat != ignore_index
        if bool(((flat < 0) | (flat >= vocabulary))[valid].any()):
            raise ValueError(f"{where}: labels hold ids outside [0, {vocabulary}) other than "
                             f"ignore_index={ignore_index}")
    return flat


def fused_linear_distill(
    hidden_S: Tensor,
    weight_S: Tensor,
    teacher: DenseTeacher | TopkTeacher,
    *,
    loss: str | None = None,
    temperature: Temperature = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    bias_S: Tensor | None = None,
    labels: Tensor | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    ignore_index: int = -100,
    shared_vocab: bool = False,
    chunk_rows: int | None = None,
    compile_blocks: bool = True,
    **loss_args: float,
) -> FusedLoss:
    r"""Distillation loss (and optionally the student's cross-entropy) from hidden states.

    ``teacher``: a :class:`DenseTeacher` — ``loss`` one of the divergence family (default
    ``"forward_kl"``; ``"jsd"``/``"scaled_jsd"`` take ``beta``, the skew KLs ``alpha``) — or a
    :class:`TopkTeacher` — ``loss`` ``"topk_kl"`` (default), ``"topk_reverse_kl"`` or
    ``"topk_jsd"`` (``beta``), each with ``tail`` (bool). ``mask`` ``rows``-shaped selects the
    distilled tokens; ``reduction`` "mean" divides the KD sum by the mask's count.

    ``labels`` ``rows``-shaped (``ignore_index`` where none): the student's hard-label
    cross-entropy at temperature 1, :math:`-\log\operatorname{softmax}(h^S W_S^\top+b_S)_y`,
    averaged over the rows with a label (or summed), computed in the same pass. Returns a
    :class:`FusedLoss`: ``loss = kd_weight * kd + ce_weight * ce`` carries the gradient; ``kd``
    and ``ce`` are the two values, detached.

    ``shared_vocab``: when the student's and the teacher's output layers have different
    numbers of rows, compare on the shared first ones (otherwise a ``ValueError``).
    ``chunk_rows``: rows per block (default: about 16 Mi logits a block and at least 128 rows; with few rows about ``rows / 8`` rows a block, at least 64).
    """
    where = "fused_linear_distill"
    sum_reduction = check_reduction(reduction, where)
    _check_width(hidden_S, weight_S, "S", where)
    _check_bias(bias_S, weight_S.size(0), "S", where)
    rows_shape = tuple(hidden_S.shape[:-1])
    vocabulary = weight_S.size(0)
    check_temperature(temperature, rows_shape, where)
    check_mask(mask, rows_shape, where)
    check_mask(labels, rows_shape, where, name="labels")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"{where}: chunk_rows={chunk_rows} must be >= 1")
    accumulate = accumulation_dtype(torch.promote_types(hidden_S.dtype, weight_S.dtype))
    rows = hidden_S[..., 0].numel()
    device = hidden_S.device
    weights = row_weights(mask, rows, accumulate, device)
    if isinstance(teacher, DenseTeacher):
        vocabulary = shared_vocabulary(weight_S.size(0), teacher.weight.size(0), shared_vocab,
                                       where, what="output layers")
        target, source = _dense_teacher(teacher, loss, loss_args, hidden_S, vocabulary,
                                        accumulate, where)
    elif isinstance(teacher, TopkTeacher):
        target, source = _topk_teacher(teacher, loss, loss_args, rows_shape, vocabulary,
                                       weights, temperature, where)
    else:
        raise TypeError(f"{where}: teacher must be a DenseTeacher(hidden, weight, bias) or a "
                        f"TopkTeacher(ids, logprobs), got {type(teacher).__name__}")
    flat_labels = None if labels is None else _flat_labels(labels, rows, vocabulary,
                                                           ignore_index, where)
    if vocabulary != weight_S.size(0):
        weight_S = weight_S[:vocabulary]
        bias_S = None if bias_S is None else bias_S[:vocabulary]
    chunk = chunk_rows or default_chunk_rows(rows, vocabulary, fused=True)
    options = FusedOptions(target, source, chunk, sum_reduction, compile_blocks,
                           float(kd_weight), float(ce_weight), ignore_index,
                           unit_temperature=_is_one(temperature))
    inv_tau = inverse_temperature(temperature, rows_shape, accumulate, device)
    total, kd, ce = fused_linear(options, hidden_S.reshape(rows, -1), weight_S, bias_S,
                                 inv_tau, weights, flat_labels)
    return FusedLoss(total, kd, ce)


def fused_linear_kd(
    hidden_S: Tensor,
    weight_S: Tensor,
    hidden_T: Tensor,
    weight_T: Tensor,
    *,
    loss: str = "forward_kl",
    temperature: Temperature = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    bias_S: Tensor | None = None,
    bias_T: Tensor | None = None,
    shared_vocab: bool = False,
    chunk_rows: int | None = None,
    compile_blocks: bool = True,
    **loss_args: Any,
) -> Tensor:
    """``loss(hidden_S @ weight_S.T + bias_S, hidden_T @ weight_T.T + bias_T, ...)`` without
    the logits: value and gradients for ``hidden_S`` ``(*rows, H_S)``, ``weight_S``
    ``(V, H_S)``, ``bias_S`` ``(V,)`` as on materialised logits; the teacher gets none.
    ``loss``: a name of the divergence family (``loss_args``: its ``beta`` / ``alpha``).
    See :func:`fused_linear_distill` for the options (and the hard-label CE)."""
    return fused_linear_distill(
        hidden_S, weight_S, DenseTeacher(hidden_T, weight_T, bias_T), loss=loss,
        temperature=temperature, mask=mask, reduction=reduction, bias_S=bias_S,
        shared_vocab=shared_vocab, chunk_rows=chunk_rows, compile_blocks=compile_blocks,
        **loss_args).loss


def fused_linear_topk_kl(
    hidden_S: Tensor,
    weight_S: Tensor,
    ids_T: Tensor,
    logprobs_T: Tensor,
    *,
    loss: str = "topk_kl",
    tail: bool = False,
    temperature: Temperature = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    bias_S: Tensor | None = None,
    chunk_rows: int | None = None,
    compile_blocks: bool = True,
    **loss_args: Any,
) -> Tensor:
    """:func:`~purekd.losses.topk_kl` (or ``loss="topk_reverse_kl"`` / ``"topk_jsd"``) of the
    student's ``hidden_S @ weight_S.T + bias_S`` against a top-k teacher, without the logits.
    See :func:`fused_linear_distill` for the options (and the hard-label CE)."""
    return fused_linear_distill(
        hidden_S, weight_S, TopkTeacher(ids_T, logprobs_T), loss=loss, temperature=temperature,
        mask=mask, reduction=reduction, bias_S=bias_S, chunk_rows=chunk_rows,
        compile_blocks=compile_blocks, tail=tail, **loss_args).loss


__all__ = ["DenseTeacher", "FusedLoss", "TopkTeacher", "fused_linear_distill",
           "fused_linear_kd", "fused_linear_topk_kl"]
