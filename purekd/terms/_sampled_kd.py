r"""The sampled-token KD term: :func:`~purekd.losses.sampled_reverse_kl` on a rollout.

From each model it takes the log-probability of the sampled tokens only:

* ``logits`` ``(B, L, V)``: :math:`\log\operatorname{softmax}(z / \tau)` at the sampled token
  (``logsumexp`` of the row, no second ``(B, L, V)`` tensor in the forward);
* a fused output layer (``lm_hidden`` + ``lm_weight`` [+ ``lm_bias``]):
  :func:`~purekd.losses.token_logprobs` — the dot product with the chosen rows of the output
  layer minus the log-normaliser computed block by block, never the ``(N, V)`` logits; only the
  kept rows go through the output layer.

The sampled tokens (``next_ids``), the sampler's log-probabilities (``sampler_logprobs``) and
the completion rows (``logits_mask``) come from the on-policy stage
(:class:`~purekd.combinators.OnPolicyStage`), which sets them on the student's outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from purekd import losses
from purekd.stages import Adapted

from ._context import Context, Term, Weight


def _token_logprobs(adapted: Adapted, ids: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """``(B, L)``: the log-probability of ``ids`` under ``adapted``'s distribution."""
    if adapted.logits:
        z = adapted.logits[0]
        z = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature
        chosen = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return torch.where(mask != 0, chosen - z.logsumexp(-1), 0.0)
    assert adapted.lm_hidden is not None and adapted.lm_weight is not None
    return losses.token_logprobs(adapted.lm_hidden, adapted.lm_weight, ids,
                                 bias=adapted.lm_bias, temperature=temperature, mask=mask)


def _has_distribution(adapted: Adapted) -> bool:
    return bool(adapted.logits) or (adapted.lm_hidden is not None
                                    and adapted.lm_weight is not None)


def sampled_token_kd(*, gamma: float = 0.0, temperature: float = 1.0, weight: Weight = 1.0,
                     name: str = "kd_loss") -> Term:
    r"""A term ``{name: sampled_reverse_kl(lp_S, lp_T, mask, sampler_logprobs, gamma)}``.

    ``lp_S``, ``lp_T``: each model's log-probability of the sampled tokens at ``temperature``
    (the loss temperature, :math:`\log\operatorname{softmax}(z/\tau)_x`); the estimator and
    the choice of a detached advantage are in :mod:`purekd.losses._sampled`. ``kept_rows``
    counts the completion tokens (token-correct normalisation). Needs outputs from the
    on-policy stage; a teacher top-k cannot serve (it lacks the sampled tokens' probabilities).
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"sampled_token_kd: gamma={gamma!r} must be a number in [0, 1]")

    def mask_of(adapted_S: Adapted) -> Tensor:
        assert adapted_S.next_ids is not None and adapted_S.logits_mask
        return adapted_S.logits_mask[0]

    def term(adapted_S: Adapted, adapted_T: Adapted, ctx: Context) -> dict[str, Tensor]:
        del ctx
        if not (_has_distribution(adapted_S) and _has_distribution(adapted_T)):
            return {}
        ids, mask = adapted_S.next_ids, mask_of(adapted_S)
        assert ids is not None
        lp_S = _token_logprobs(adapted_S, ids, mask, temperature)
        with torch.no_grad():
            lp_T = _token_logprobs(adapted_T, ids, mask, temperature)
        return {name: losses.sampled_reverse_kl(lp_S, lp_T, mask=mask,
                                                sampler_logprobs=adapted_S.sampler_logprobs,
                                                gamma=gamma)}

    def check(adapted_S: Adapted, adapted_T: Adapted) -> None:
        if adapted_T.topk_ids is not None:
            raise ValueError(
                "kd_loss_type='sampled_reverse_kl' with a teacher top-k cache: the cache has "
                "the teacher's top-k of the dataset's text, not the log-probabilities of newly "
                "sampled tokens; the teacher must run on the rollouts (no teacher_cache)")
        if not (_has_distribution(adapted_S) and _has_distribution(adapted_T)):
            return
        if adapted_S.next_ids is None or not adapted_S.logits_mask:
            raise ValueError(
                "kd_loss_type='sampled_reverse_kl' scores sampled tokens, but these outputs "
                "carry none: it runs on rollouts, so give the step "
                "DistillationConfig(on_policy=OnPolicyConfig(lmbda=1.0)) (or put an "
                "OnPolicyStage in front of the models stage)")
        forms = ["logits" if a.logits else "fused" for a in (adapted_S, adapted_T)]
        if forms[0] != forms[1]:
            raise ValueError(
                f"kd_loss_type='sampled_reverse_kl': the student's adaptor returned "
                f"{forms[0]} outputs and the teacher's {forms[1]}; return the same form from "
                "both ('logits', or 'lm_hidden' + 'lm_weight')")
        size_S = (adapted_S.logits[0].size(-1) if adapted_S.logits
                  else adapted_S.lm_weight.size(0))  # type: ignore[union-attr]
        size_T = (adapted_T.logits[0].size(-1) if adapted_T.logits
                  else adapted_T.lm_weight.size(0))  # type: ignore[union-attr]
        if size_S != size_T:
            raise ValueError(
                f"kd_loss_type='sampled_reverse_kl': the student's vocabulary has {size_S} "
                f"entries and the teacher's {size_T}; on-policy distillation scores the "
                "student's token ids with the teacher, so both must share one tokenizer (for "
                "different tokenizers use cross-tokenizer distillation)")

    def count(adapted_S: Adapted, adapted_T: Adapted) -> Tensor | None:
        if not (_has_distribution(adapted_S) and _has_distribution(adapted_T)):
            return None
        mask = mask_of(adapted_S)
        dtype = torch.float64 if (adapted_S.logits and adapted_S.logits[0].dtype == torch.float64
                                  ) else torch.float32
        return (mask != 0).sum().to(dtype)

    return Term(term, weight, check, name, kept_rows=count)


__all__ = ["sampled_token_kd"]
