r"""The sampled-token reverse KL: a policy-gradient estimator of :math:`KL(p_S \| p_T)` that
needs, from each model, only the log-probability of the tokens that were sampled.

A sequence :math:`x` of completion tokens is drawn from a sampler :math:`q` (the student
itself, on-policy; or another model, e.g. the teacher with ``seq_kd``). With
:math:`\ell^S_t = \log p_S(x_t \mid x_{<t})`, :math:`\ell^T_t = \log p_T(x_t \mid x_{<t})`,
:math:`\ell^q_t = \log q(x_t \mid x_{<t})` and :math:`m_t` the completion mask:

.. math::

    \delta_t = \ell^S_t - \ell^T_t \qquad \text{(the per-token sampled reverse KL)}

    A_t = -\sum_{u \ge t} \gamma^{\,u - t}\, m_u\, \operatorname{sg}(\delta_u)
    \qquad \text{(the advantage: the teacher's log-probability minus the student's,
    discounted over the tokens that follow)}

    r_t = \exp\big(\ell^S_t - \operatorname{sg}(\ell^q_t)\big)
    \qquad \text{(importance ratio; } \ell^q = \operatorname{sg}(\ell^S) \text{ without a sampler)}

    \mathcal{L} = -\frac{\sum_t m_t\, r_t\, A_t}{\sum_t m_t}

``sg`` is stop-gradient. **The advantage is detached**: the gradient is the score-function
(REINFORCE) estimator

.. math:: \nabla \mathcal{L} = -\frac{1}{\sum m} \sum_t m_t\, r_t\, A_t\, \nabla \ell^S_t,

which, with :math:`\gamma = 1` and :math:`x \sim p_S` (:math:`r = 1`), is an unbiased estimate
of :math:`\nabla_\theta\, KL(p_S \| p_T)` over whole sequences (per token of the batch): the
term :math:`E_{p_S}[\nabla \ell^S] = 0` drops out, and each token's log-probability is credited
with the log-ratio of itself and every later token. :math:`\gamma = 0` (the default) credits each
token with its own log-ratio only — the per-token form of on-policy distillation (lower
variance, biased towards the next token's KL); :math:`0 < \gamma < 1` interpolates (MiniLLM
uses the undiscounted sum with importance weights against the sampler). Were the advantage
*not* detached, the gradient would add :math:`\nabla \delta_t` — the gradient of the sampled
log-ratio for fixed tokens — which is not the gradient of the expectation.

The value: with :math:`r = 1` and :math:`\gamma = 0` it is the mean over completion tokens of
:math:`\ell^S_t - \ell^T_t`, a Monte-Carlo estimate of the per-token reverse KL (it can be
negative on one batch). Importance ratios are not clipped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from purekd._masked import safe_divide

from ._checks import accumulation_dtype, check_mask, check_reduction


def discounted_suffix_sum(values: Tensor, gamma: float) -> Tensor:
    r"""``out[..., t] = sum_{u >= t} gamma^(u - t) values[..., u]`` along the last dimension.

    ``values`` ``(*, L)``; computed as one product with the ``(L, L)`` upper-triangular matrix
    :math:`G_{tu} = \gamma^{u-t}` (``u >= t``), so it compiles without a loop; ``gamma = 0``
    returns ``values``.
    """
    if gamma == 0:
        return values
    length = values.size(-1)
    index = torch.arange(length, device=values.device)
    gap = (index.unsqueeze(0) - index.unsqueeze(1)).to(values.dtype)  # gap[t, u] = u - t
    upper = gap >= 0
    powers = torch.where(upper, torch.pow(torch.full_like(gap, float(gamma)),
                                          torch.where(upper, gap, 0.0)), 0.0)
    return values @ powers.transpose(0, 1)


def sampled_reverse_kl(
    logprobs_S: Tensor,
    logprobs_T: Tensor,
    *,
    mask: Tensor | None = None,
    sampler_logprobs: Tensor | None = None,
    gamma: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    r"""The sampled-token reverse KL :math:`\mathcal{L}` of the module docstring.

    ``logprobs_S`` ``(B, L)``: the student's log-probability of each sampled token (with
    gradients); ``logprobs_T`` ``(B, L)``: the teacher's (no gradient is taken through it);
    ``sampler_logprobs`` ``(B, L)`` or ``None``: the sampler's, for the importance ratio;
    ``mask`` ``(B, L)`` 0/1: the completion tokens (rows of one sequence in order, so the
    discount runs along ``L``). ``gamma`` in [0, 1]. ``reduction``: ``"mean"`` over the kept
    tokens, or ``"sum"``. Returns a 0-dim tensor in float32 at least; every token masked gives 0
    with finite (zero) gradients.
    """
    where = "sampled_reverse_kl"
    sum_reduction = check_reduction(reduction, where)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"{where}: gamma={gamma!r} must be a number in [0, 1] (0: each token's "
                         "own log-ratio; 1: the undiscounted sum over the following tokens)")
    if logprobs_S.dim() != 2 or tuple(logprobs_T.shape) != tuple(logprobs_S.shape):
        raise ValueError(f"{where}: logprobs_S {tuple(logprobs_S.shape)} and logprobs_T "
                         f"{tuple(logprobs_T.shape)} must both be (batch, length)")
    rows = tuple(logprobs_S.shape)
    check_mask(mask, rows, where)
    check_mask(sampler_logprobs, rows, where, "sampler_logprobs")
    dtype = accumulation_dtype(logprobs_S.dtype)
    keep = (torch.ones(rows, dtype=torch.bool, device=logprobs_S.device) if mask is None
            else mask != 0)
    zero = torch.zeros((), dtype=dtype, device=logprobs_S.device)
    student = torch.where(keep, logprobs_S.to(dtype), zero)
    teacher = torch.where(keep, logprobs_T.detach().to(dtype), zero)
    weights = keep.to(dtype)
    advantage = -discounted_suffix_sum((student.detach() - teacher) * weights, float(gamma))
    behaviour = student.detach() if sampler_logprobs is None else torch.where(
        keep, sampler_logprobs.detach().to(dtype), zero)
    ratio = torch.exp(student - behaviour)
    total = (torch.where(keep, ratio * advantage, zero)).sum()
    return -(total if sum_reduction else safe_divide(total, weights.sum()))


__all__ = ["discounted_suffix_sum", "sampled_reverse_kl"]
