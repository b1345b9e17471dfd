"""Token-level losses one block of rows at a time: on logits, or fused with the output layer.

One per-block kernel interface serves every divergence and both drivers. A *target* (what the
student's block is compared with) turns a block of student logits ``s`` ``(C, V)`` and the
teacher's block — dense logits ``(C, V)``, or top-k ids and log-probabilities ``(C, k)`` —
into the per-row loss and, on request, its gradient for the (temperature-scaled) logits, from
the closed forms of :mod:`._divergences`. :func:`block_kernel` wraps a target into a
``torch.compile``-d kernel (one per target, gradient flags and hard-label option) that also
applies the row weights, the reduction's scale and the temperature, and adds the optional
hard-label cross-entropy of the student.

* :class:`_OnLogits` (:func:`blockwise_on_logits`) — logits given: the forward computes the
  value block by block; the backward recomputes each block with its gradient. The only
  full-size tensors it creates are the gradients.
* :class:`_FusedLinear` (:func:`fused_linear`) — hidden states and output-layer weights given:
  each block's logits are computed (float32 at least), the kernel gives the gradient for them,
  and it goes straight into the gradients for the hidden states, weights and bias, during the
  forward (four GEMMs a block in all). Neither model's ``(N, V)`` logits ever exist; the extra
  memory is the ``(V, H)`` weight gradient and a few ``(C, V)`` blocks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from purekd._compiling import Compiled, blocks_may_compile, compiled
from purekd._masked import safe_divide

from ._divergences import Divergence, through_log_softmax

DEFAULT_BLOCK_ELEMENTS = 1 << 23
"""Logits per block when no ``chunk_rows`` is given: 8 Mi entries (32 MiB in float32)."""

COMPILE_BLOCKS = True
"""Whether block kernels may be compiled at all (tests switch it off to skip compile time). A
step built with ``compile=False`` runs its losses' blocks eagerly without touching this: its
loss path runs inside :func:`purekd._compiling.eager_blocks`, for the extent of each call."""

BlockOutput = tuple[Tensor, Tensor | None, tuple[Tensor | None, ...], Tensor]
"""A target's block: per-row value, gradient for the student's (scaled) logits, gradients for
the teacher's tensors, and whether each row of the teacher is a distribution (finite)."""


FUSED_BLOCK_ELEMENTS = 1 << 24
"""At most about this many logits per block of the fused output-layer losses (16 Mi entries, 64
MiB in float32), and at least :data:`FUSED_MIN_BLOCK_ROWS` rows: the block size for many rows."""

FUSED_MIN_BLOCK_ROWS = 128
"""At least this many rows per fused block when there are many rows: the weight gradient's GEMM
(``(V, rows) @ (rows, H)``) reduces over the block's rows, and below ~128 it runs far from the
machine's peak (measured on CPU: ~1.6x the time per row at 64 rows than at 336)."""

FUSED_BLOCKS = 8
"""With few rows, the fused losses split them into about this many blocks (of at least
:data:`FUSED_FEW_ROWS_BLOCK` rows) instead of one or two large ones. Each block adds its share
of the weight gradient into the ``(V, H)`` buffer, a pass over all of it, so many rows want few,
large blocks; few rows want small ones, whose buffers then stay small beside that gradient.
Measured on CPU (2 threads, V 49152, H 576, compiled block kernels, forward + backward): 256
rows took the same time in 64-row blocks as in 128-row ones and 0.86x the time of one 256-row
block, with 168 against 348 MiB of extra memory; 4096 rows took 9.3 s in 64-row blocks, 8.8 s in
128-row, 7.5 s in 192- and 336-row ones."""

FUSED_FEW_ROWS_BLOCK = 64
"""The smallest fused block :data:`FUSED_BLOCKS` makes (12 MiB at 49k entries)."""


def default_chunk_rows(rows: int, vocabulary: int, *, fused: bool = False) -> int:
    """Rows per block, a multiple of 8 and at most ``rows``: :data:`DEFAULT_BLOCK_ELEMENTS`
    logits. ``fused``: :data:`FUSED_BLOCK_ELEMENTS` logits, at least
    :data:`FUSED_MIN_BLOCK_ROWS` rows (its GEMMs dominate; the blocks are reused buffers), or
    fewer rows when there are few, about ``rows / FUSED_BLOCKS`` but at least
    :data:`FUSED_FEW_ROWS_BLOCK` — except inside a compiled graph (a step with
    ``compile=True``), where the in-place accumulation of the ``(V, H)`` weight gradient becomes
    an out-of-place sum and a copy of ``(V, H)`` per block, so the blocks stay the large ones."""
    elements, least = ((FUSED_BLOCK_ELEMENTS, FUSED_MIN_BLOCK_ROWS) if fused
                       else (DEFAULT_BLOCK_ELEMENTS, 8))
    chunk = max(least, (elements // max(vocabulary, 1)) // 8 * 8)
    if fused and not torch.compiler.is_compiling():
        share = -(-rows // FUSED_BLOCKS)
        chunk = min(chunk, max(FUSED_FEW_ROWS_BLOCK, -(-share // 8) * 8))
    return max(1, min(rows, chunk))


def log_softmax(z: Tensor) -> Tensor:
    """``log_softmax(z, -1)`` written out (max, then log-sum-exp): compiles to fewer passes
    over the block than ``Tensor.log_softmax``'s decomposition, with the same values."""
    return log_softmax_and_finite(z)[0]


def log_softmax_and_finite(z: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`log_softmax` and, per row, whether it is a distribution: the row's maximum is
    finite (False for a NaN or a +inf entry, or every entry -inf). A single -inf is fine."""
    top = z.amax(-1, keepdim=True)
    shifted = z - top
    return shifted - shifted.exp().sum(-1, keepdim=True).log(), top.squeeze(-1).isfinite()


# --------------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class DenseTarget:
    """The teacher's dense logits ``(C, V)``: ``divergence(p_T, p_S)`` on the full vocabulary."""

    divergence: Divergence

    @property
    def key(self) -> tuple[object, ...]:
        return ("dense", *self.divergence.key)

    def block(self, z: Tensor, log_p_S: Tensor, teacher: tuple[Tensor, ...], inv_tau: Tensor,
              keep: Tensor, grad_S: bool, grad_T: bool) -> BlockOutput:
        (t,) = teacher
        log_p_T, finite_T = log_softmax_and_finite(torch.where(keep, t.to(z.dtype), 0.0) * inv_tau)
        value, a_S, a_T = self.divergence.rows(log_p_S, log_p_T, grad_S, grad_T)
        g_S = (through_log_softmax(a_S, log_p_S, self.divergence.student_total)
               if a_S is not None else None)
        g_T = through_log_softmax(a_T, log_p_T) if a_T is not None else None
        return value, g_S, (g_T,), finite_T


TOPK_MODES = ("support", "renormalised", "tail")


@dataclasses.dataclass(frozen=True)
class TopkTarget:
    """The teacher's top-k ``(ids, logprobs)`` ``(C, k)`` (log-softmax at T=1).

    ``mode``: ``"support"`` — the teacher renormalised over its k entries at the temperature,
    against the student's full-vocabulary log-probabilities at those ids; ``"renormalised"`` —
    both sides renormalised over the k ids; ``"tail"`` — k buckets plus one holding each side's
    remaining mass (temperature 1). The divergence is computed on these k (or k+1) entries.
    """

    divergence: Divergence
    mode: str

    @property
    def key(self) -> tuple[object, ...]:
        return ("topk", self.mode, *self.divergence.key)

    def block(self, z: Tensor, log_p: Tensor, teacher: tuple[Tensor, ...], inv_tau: Tensor,
              keep: Tensor, grad_S: bool, grad_T: bool) -> BlockOutput:
        ids, logprobs = teacher
        ids = torch.where(keep, ids, 0)
        log_q = torch.where(keep, logprobs.to(z.dtype), 0.0)
        # a distribution: no NaN, nothing above log 1 = 0 (the checks outside compiled code
        # raise on these; inside, the row's value and gradient become NaN together)
        top = log_q.amax(-1)
        finite_T = (top.isfinite() & (top <= 0)) | ~keep.squeeze(-1)
        in_support = None
        if self.mode == "tail":
            tail_T = (1 - log_q.exp().sum(-1, keepdim=True)).clamp_min(0.0)
            in_support = torch.zeros_like(z, dtype=torch.bool).scatter(1, ids, True)
            log_tail_S = torch.where(in_support, float("-inf"), log_p).logsumexp(-1, keepdim=True)
            # no entry outside the support (k = V): both tails are empty
            tail_T = torch.where(torch.isneginf(log_tail_S), 0.0, tail_T)
            buckets_S = torch.cat([log_p.gather(1, ids), log_tail_S], dim=-1)
            buckets_T = torch.cat([log_q, tail_T.log()], dim=-1)
        elif self.mode == "support":
            buckets_S = log_p.gather(1, ids)
            buckets_T = (log_q * inv_tau).log_softmax(-1)
        else:
            buckets_S = z.gather(1, ids).log_softmax(-1)
            buckets_T = (log_q * inv_tau).log_softmax(-1)
        value, a, _ = self.divergence.rows(buckets_S, buckets_T, grad_S, False)
        if a is None:
            return value, None, (), finite_T
        k = ids.size(-1)
        if self.mode == "renormalised":  # the gradient lives on the k ids only
            g = torch.zeros_like(z).scatter_add(1, ids, through_log_softmax(a, buckets_S))
        elif self.mode == "support":
            g = torch.zeros_like(z).scatter_add(1, ids, a) - log_p.exp() * a.sum(-1, keepdim=True)
        else:
            assert in_support is not None
            # d log tail_S / dz_v = [v outside] p_v / tail_S - p_v
            outside = torch.where(in_support, 0.0, (log_p - buckets_S[:, k:]).exp())
            g = (torch.zeros_like(z).scatter_add(1, ids, a[:, :k]) + a[:, k:] * outside
                 - log_p.exp() * a.sum(-1, keepdim=True))
        return value, g, (), finite_T


Target = DenseTarget | TopkTarget


# --------------------------------------------------------------------------------- kernel
def _kernel(s: Tensor, teacher: tuple[Tensor, ...], inv_tau: Tensor, weights: Tensor,
            scale: Tensor, labels: Tensor | None, ce_scale: Tensor | None, *, target: Target,
            grad_S: bool, grad_T: bool, ignore_index: int, grad_dtype: torch.dtype | None,
            unit_temperature: bool = False, gradient_into_logits: bool = False
            ) -> tuple[Tensor, Tensor, Tensor | None, tuple[Tensor | None, ...]]:
    """One block: ``(sum_r w_r D_r, sum_r CE_r, dL/ds, dL/dteacher)``.

    ``s`` ``(C, V)`` student logits, ``inv_tau`` ``(C, 1)``, ``weights`` ``(C,)`` in the
    accumulation dtype, ``scale`` 0-dim: the factor of the KD sum in the loss (1/count for the
    mean). ``labels`` ``(C,)`` (``ignore_index`` where none) with ``ce_scale`` the factor of
    the CE sum, or None. Gradients are of ``scale * KD sum + ce_scale * CE sum``, 0 in rows of
    weight 0; ``grad_dtype`` None keeps the accumulation dtype. ``unit_temperature``: the
    temperature is known to be 1, so the KD and the CE share one log-softmax of the block.
    ``gradient_into_logits``: ``dL/ds`` is written into ``s`` itself and ``s`` returned (the
    fused driver's logits block is scratch space; compiled, the last pass stores straight into
    it, so no block-sized output is allocated).
    """
    accumulate = weights.dtype
    keep = (weights != 0).unsqueeze(-1)
    raw = s.to(accumulate)
    valid = None if labels is None else (labels != ignore_index).unsqueeze(-1)
    shared = unit_temperature and valid is not None
    if shared:
        assert valid is not None
        z = torch.where(keep | valid, raw, 0.0)  # rows used by neither stay finite zeros
    else:
        z = torch.where(keep, raw, 0.0) * inv_tau
    log_p_S, finite_S = log_softmax_and_finite(z)
    value, g_S, g_T, finite_T = target.block(z, log_p_S, teacher, inv_tau, keep, grad_S, grad_T)
    # a row that is no distribution on either side: its value and its gradients are NaN alike
    finite = (finite_S & finite_T).unsqueeze(-1)
    value = torch.where(finite.squeeze(-1), value, float("nan"))
    kd = (torch.where(keep.squeeze(-1), value, 0.0) * weights).sum()
    row_scale = (weights * scale).unsqueeze(-1) * inv_tau

    def rows_out(g: Tensor) -> Tensor:
        return torch.where(keep, torch.where(finite, g * row_scale, float("nan")), 0.0)

    out_S = rows_out(g_S) if g_S is not None else None
    out_T = tuple(rows_out(g) if g is not None else None for g in g_T)
    ce = weights.new_zeros(())
    if labels is not None:
        assert ce_scale is not None and valid is not None
        safe = torch.where(valid, labels.unsqueeze(-1), 0)
        log_p1 = log_p_S if shared else log_softmax(torch.where(valid, raw, 0.0))
        ce = torch.where(valid, -log_p1.gather(1, safe), 0.0).sum()
        if grad_S:
            one_hot = torch.zeros_like(log_p1).scatter(1, safe, 1.0)
            g_ce = torch.where(valid, (log_p1.exp() - one_hot) * ce_scale, 0.0)
            out_S = g_ce if out_S is None else out_S + g_ce
    dtype = grad_dtype or accumulate
    if gradient_into_logits and out_S is not None:
        out_S = s.copy_(out_S)
    return (kd, ce, out_S.to(dtype) if out_S is not None else None,
            tuple(g.to(dtype) if g is not None else None for g in out_T))


_KERNELS: dict[tuple[object, ...], Compiled] = {}


def block_kernel(target: Target, *, grad_S: bool, grad_T: bool = False,
                 ignore_index: int = -100, grad_dtype: torch.dtype | None = None,
                 unit_temperature: bool = False, gradient_into_logits: bool = False,
                 compile_blocks: bool = True) -> Callable[..., Any]:
    """The kernel for ``target`` with these options: compiled (once per block shape) when
    ``compile_blocks`` and not already inside a compiled region, else eager."""
    eager = functools.partial(_kernel, target=target, grad_S=grad_S, grad_T=grad_T,
                              ignore_index=ignore_index, grad_dtype=grad_dtype,
                              unit_temperature=unit_temperature,
                              gradient_into_logits=gradient_into_logits)
    if torch.compiler.is_compiling() or not (compile_blocks and COMPILE_BLOCKS):
        return eager
    key = (target.key, grad_S, grad_T, ignore_index, grad_dtype, unit_temperature,
           gradient_into_logits)
    if key not in _KERNELS:
        _KERNELS[key] = compiled(eager, dynamic=True)
    return _KERNELS[key]


def _denominator(weights: Tensor, sum_reduction: bool) -> Tensor:
    return weights.new_ones(()) if sum_reduction else weights.sum()


# ------------------------------------------------------------------------ on logits
class _OnLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, target: Target, chunk_rows: int, sum_reduction: bool,
                compile_blocks: bool, logits_S: Tensor, inv_tau: Tensor, weights: Tensor,
                teacher_a: Tensor, teacher_b: Tensor | None) -> Tensor:
        # two fixed teacher slots, not *teacher: Dynamo mis-binds varargs of autograd.Function
        teacher = (teacher_a,) if teacher_b is None else (teacher_a, teacher_b)
        kernel = block_kernel(target, grad_S=False, compile_blocks=compile_blocks)
        total = weights.new_zeros(())
        one = weights.new_ones(())
        for start in range(0, logits_S.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            kd, _, _, _ = kernel(logits_S[rows], tuple(t[rows] for t in teacher), inv_tau[rows],
                                 weights[rows], one, None, None)
            total = total + kd
        denominator = _denominator(weights, sum_reduction)
        ctx.save_for_backward(logits_S, inv_tau, weights, denominator, *teacher)
        ctx.options = (target, chunk_rows, compile_blocks)
        return safe_divide(total, denominator)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        logits_S, inv_tau, weights, denominator, *teacher = ctx.saved_tensors
        target, chunk_rows, compile_blocks = ctx.options
        want_S = ctx.needs_input_grad[4]
        want_T = isinstance(target, DenseTarget) and ctx.needs_input_grad[7]
        kernel = block_kernel(target, grad_S=want_S, grad_T=want_T,
                              grad_dtype=logits_S.dtype, compile_blocks=compile_blocks)
        scale = safe_divide(grad_output.to(denominator.dtype), denominator)
        grad_S = torch.empty_like(logits_S) if want_S else None
        grad_T = torch.empty_like(teacher[0]) if want_T else None
        for start in range(0, logits_S.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            _, _, g_S, g_T = kernel(logits_S[rows], tuple(t[rows] for t in teacher),
                                    inv_tau[rows], weights[rows], scale, None, None)
            if grad_S is not None:
                grad_S[rows] = g_S
            if grad_T is not None:
                grad_T[rows] = g_T[0]
        return (None, None, None, None, grad_S, None, None, grad_T, None)


def blockwise_on_logits(target: Target, logits_S: Tensor, teacher: tuple[Tensor, ...],
                        inv_tau: Tensor, weights: Tensor, *, chunk_rows: int,
                        sum_reduction: bool, compile_blocks: bool = True) -> Tensor:
    """``target``'s loss on 2-d ``logits_S`` ``(N, V)`` and the teacher's 2-d tensors, ``chunk_rows``
    rows at a time; ``inv_tau`` ``(N, 1)``, ``weights`` ``(N,)`` in the accumulation dtype.
    The mean divides by ``weights.sum()``. The temperature carries no gradient; the teacher's
    dense logits get one when they require it."""
    if len(teacher) not in (1, 2):
        raise ValueError(f"blockwise_on_logits: 1 or 2 teacher tensors, got {len(teacher)}")
    if compile_blocks and not torch.compiler.is_compiling():  # (a ContextVar breaks a graph)
        compile_blocks = blocks_may_compile()  # decided now, kept for the backward
    result: Tensor = _OnLogits.apply(target, chunk_rows, sum_reduction, compile_blocks, logits_S,
                                     inv_tau, weights, teacher[0],
                                     teacher[1] if len(teacher) == 2 else None)
    return result


# ------------------------------------------------------------------------ fused
class Teacher(NamedTuple):
    """The teacher's side of a fused loss: ``kind`` ``"dense"`` with tensors
    ``(hidden_T, weight_T, bias_T or None)``, or ``"topk"`` with ``(ids_T, logprobs_T)``."""

    kind: str
    tensors: tuple[Tensor | None, ...]

    def block(self, rows: slice, accumulate: torch.dtype,
              out: Tensor | None = None) -> tuple[Tensor, ...]:
        """The block's teacher tensors; a dense teacher's logits go into ``out`` when given
        (a reused ``(rows, V)`` buffer)."""
        if self.kind == "topk":
            ids, logprobs = self.tensors
            assert ids is not None and logprobs is not None
            return ids[rows], logprobs[rows]
        hidden, weight, bias = self.tensors
        assert hidden is not None and weight is not None
        return (_linear(hidden[rows].to(accumulate), weight.to(accumulate),
                        None if bias is None else bias.to(accumulate), out),)


def _linear(hidden: Tensor, weight: Tensor, bias: Tensor | None,
            out: Tensor | None = None) -> Tensor:
    """``hidden @ weight.T (+ bias)``, into ``out`` when given."""
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def add_linear_gradients(g: Tensor, hidden: Tensor, weight: Tensor, rows: slice,
                         grad_h: Tensor | None, grad_w: Tensor | None,
                         grad_b: Tensor | None) -> None:
    """For a block of ``logits = hidden @ weight.T + bias`` with logit gradient ``g`` ``(n, V)``:
    write ``g @ weight`` into ``grad_h[rows]`` and add ``g.T @ hidden`` to ``grad_w`` and the
    column sums of ``g`` to ``grad_b`` (each where given)."""
    if grad_h is not None:
        torch.mm(g, weight, out=grad_h[rows])
    if grad_w is not None:
        grad_w.addmm_(g.t(), hidden)
    if grad_b is not None:
        grad_b += g.sum(0)


class FusedOptions(NamedTuple):
    target: Target
    teacher: Teacher
    chunk_rows: int
    sum_reduction: bool
    compile_blocks: bool
    kd_weight: float
    ce_weight: float
    ignore_index: int
    unit_temperature: bool = False


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, options: FusedOptions, hidden_S: Tensor, weight_S: Tensor,
                bias_S: Tensor | None, inv_tau: Tensor, weights: Tensor,
                labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        want_h, want_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        want_b = bias_S is not None and ctx.needs_input_grad[3]
        grad = want_h or want_w or want_b
        accumulate = weights.dtype
        kernel = block_kernel(options.target, grad_S=grad, ignore_index=options.ignore_index,
                              unit_temperature=options.unit_temperature and labels is not None,
                              gradient_into_logits=True, compile_blocks=options.compile_blocks)
        weight = weight_S.to(accumulate)
        bias = None if bias_S is None else bias_S.to(accumulate)
        n, width = hidden_S.shape
        grad_h = torch.empty(n, width, dtype=accumulate, device=hidden_S.device) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        grad_b = torch.zeros_like(bias) if want_b and bias is not None else None
        denominator = _denominator(weights, options.sum_reduction)
        kd_scale = safe_divide(weights.new_tensor(options.kd_weight), denominator)
        ce_denominator = ce_scale = None
        if labels is not None:
            valid = (labels != options.ignore_index).to(accumulate)
            ce_denominator = _denominator(valid, options.sum_reduction)
            ce_scale = safe_divide(weights.new_tensor(options.ce_weight), ce_denominator)
        kd_total, ce_total = weights.new_zeros(()), weights.new_zeros(())
        # two (chunk_rows, V) buffers serve every block: the student's logits, then the gradient
        # for them (the kernel writes it in place), and a dense teacher's logits. Fresh
        # block-sized allocations would each be page-faulted in anew (glibc returns large
        # freed blocks to the system), which costs as much as a GEMM.
        chunk = min(options.chunk_rows, n)
        vocabulary = weight.size(0)
        logits_buffer = hidden_S.new_empty(chunk, vocabulary, dtype=accumulate)
        teacher_buffer = (logits_buffer.new_empty(chunk, vocabulary)
                          if options.teacher.kind == "dense" else None)
        for start in range(0, n, options.chunk_rows):
            rows = slice(start, start + options.chunk_rows)
            h = hidden_S[rows].to(accumulate)
            count = h.size(0)
            s = _linear(h, weight, bias, logits_buffer[:count])
            block_T = options.teacher.block(
                rows, accumulate, None if teacher_buffer is None else teacher_buffer[:count])
            kd, ce, g, _ = kernel(s, block_T, inv_tau[rows], weights[rows], kd_scale,
                                  None if labels is None else labels[rows], ce_scale)
            kd_total, ce_total = kd_total + kd, ce_total + ce
            if g is None:
                continue
            add_linear_gradients(g, h, weight, rows, grad_h, grad_w, grad_b)
        kd_value = safe_divide(kd_total, denominator)
        ce_value = (safe_divide(ce_total, ce_denominator) if ce_denominator is not None
                    else ce_total)
        loss = options.kd_weight * kd_value + options.ce_weight * ce_value
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden_S.dtype, weight_S.dtype, None if bias_S is None else bias_S.dtype)
        ctx.mark_non_differentiable(kd_value, ce_value)
        return loss, kd_value, ce_value

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _grad_kd: Tensor,
                 _grad_ce: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        # the usual case, loss.backward(): the gradients computed in the forward as they are
        unit = not torch.compiler.is_compiling() and bool(grad_loss == 1)
        grads = [None if g is None else (g if unit else g * grad_loss.to(g.dtype)).to(dtype)
                 for g, dtype in zip(saved, ctx.dtypes, strict=True)]
        return (None, *grads, None, None, None)


def fused_linear(options: FusedOptions, hidden_S: Tensor, weight_S: Tensor,
                 bias_S: Tensor | None, inv_tau: Tensor, weights: Tensor,
                 labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(kd_weight KD + ce_weight CE, KD, CE)`` from 2-d hidden states, computed ``chunk_rows``
    rows at a time; only the first carries gradients (for ``hidden_S``, ``weight_S``,
    ``bias_S``); the teacher gets none."""
    if options.compile_blocks and not torch.compiler.is_compiling() \
            and not blocks_may_compile():  # inside a compile=False step (eager: no graph)
        options = options._replace(compile_blocks=False)
    result: tuple[Tensor, Tensor, Tensor] = _FusedLinear.apply(
        options, hidden_S, weight_S, bias_S, inv_tau, weights, labels)
    return result


__all__ = ["DEFAULT_BLOCK_ELEMENTS", "FUSED_BLOCKS", "FUSED_BLOCK_ELEMENTS", "FUSED_FEW_ROWS_BLOCK",
           "FUSED_MIN_BLOCK_ROWS", "DenseTarget",
           "FusedOptions", "Teacher", "TopkTarget",
           "block_kernel", "blockwise_on_logits", "default_chunk_rows", "fused_linear"]
