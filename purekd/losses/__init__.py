"""Layer 1 — loss functions: pure functions of tensors.

No state, no config objects, no Python branch on a tensor's value. Masks are applied by
weighting, so every loss compiles with ``torch.compile(fullgraph=True)`` without graph breaks,
and no input is modified. Values equal TextBrewer 0.2.1's for the same inputs.

Logits: :func:`kd_ce`, :func:`kd_mse` ``(logits_S, logits_T, temperature=1, mask=None)``.
Token-level divergences (language models): :func:`forward_kl`, :func:`reverse_kl`,
:func:`jsd`, :func:`scaled_jsd`, :func:`skew_forward_kl`, :func:`skew_reverse_kl`, :func:`tvd`
``(logits_S, logits_T, *, temperature=1.0, mask=None, reduction="mean", ...)``; each declared
once in a registry (:mod:`._divergences`), where :func:`register_divergence` adds one and
:func:`divergence` ``(name, **params)`` fetches one by name.
Top-k teacher: :func:`topk_kl`, :func:`topk_reverse_kl`, :func:`topk_jsd`
``(logits_S, ids_T, logprobs_T, *, tail=False, ...)``. From hidden states and output-layer
weights, never holding the logits: :func:`fused_linear_kd`, :func:`fused_linear_topk_kl`,
:func:`fused_linear_distill` (with the student's hard-label cross-entropy).
Different tokenizers (aligned spans): :func:`aligned_uld`, :func:`aligned_gold`, and from a
top-k teacher (a cross-tokenizer cache) :func:`aligned_uld_topk`, :func:`aligned_gold_topk`;
:func:`uld`
is the sorted-probability L1 row against row (``kd_loss_type="uld"``).
Sampled tokens (on-policy): :func:`sampled_reverse_kl` on per-token log-probabilities, and
:func:`token_logprobs` (a token's log-probability from hidden states, without the logits).
Features: each ``(feature_S, feature_T, mask=None) -> 0-dim Tensor``.
"""

from collections.abc import Callable

from torch import Tensor

from ._attention import attention_ce, attention_ce_mean, attention_mse, attention_mse_sum
from ._chunked import kd_ce_chunked
from ._family import (
    divergence,
    divergence_table,
    forward_kl,
    jsd,
    register_divergence,
    reverse_kl,
    scaled_jsd,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
    unregister_divergence,
)
from ._fused import (
    DenseTeacher,
    FusedLoss,
    TopkTeacher,
    fused_linear_distill,
    fused_linear_kd,
    fused_linear_topk_kl,
)
from ._gold import VocabularyMap, aligned_gold
from ._hidden import cos, hidden_mse, pkd
from ._logits import kd_ce, kd_mse
from ._sampled import discounted_suffix_sum, sampled_reverse_kl
from ._similarity import fsp, gram, mmd, nst
from ._spans import AlignedSpans, merged_log_probs
from ._spans_topk import TopkSpanTeacher, aligned_gold_topk, aligned_uld_topk
from ._token_logprob import token_logprobs
from ._topk import topk_jsd, topk_kl, topk_reverse_kl
from ._uld import aligned_uld, sorted_l1, uld

MATCH_LOSSES: dict[str, Callable[..., Tensor]] = {
    "attention_mse_sum": attention_mse_sum,
    "attention_mse": attention_mse,
    "attention_ce_mean": attention_ce_mean,
    "attention_ce": attention_ce,
    "hidden_mse": hidden_mse,
    "cos": cos,
    "pkd": pkd,
    "gram": gram,
    "fsp": fsp,
    "mmd": mmd,
    "nst": nst,
}
"""purekd's intermediate-feature losses by TextBrewer's names, each ``(feature_S, feature_T,
mask=None) -> 0-dim`` (:data:`purekd.presets.MATCH_LOSS_MAP` starts from these)."""

__all__ = [
    "MATCH_LOSSES",
    "AlignedSpans",
    "DenseTeacher",
    "FusedLoss",
    "TopkSpanTeacher",
    "TopkTeacher",
    "VocabularyMap",
    "aligned_gold",
    "aligned_gold_topk",
    "aligned_uld",
    "aligned_uld_topk",
    "attention_ce",
    "attention_ce_mean",
    "attention_mse",
    "attention_mse_sum",
    "cos",
    "discounted_suffix_sum",
    "divergence",
    "divergence_table",
    "forward_kl",
    "fsp",
    "fused_linear_distill",
    "fused_linear_kd",
    "fused_linear_topk_kl",
    "gram",
    "hidden_mse",
    "jsd",
    "kd_ce",
    "kd_ce_chunked",
    "kd_mse",
    "merged_log_probs",
    "mmd",
    "nst",
    "pkd",
    "register_divergence",
    "reverse_kl",
    "sampled_reverse_kl",
    "scaled_jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sorted_l1",
    "token_logprobs",
    "topk_jsd",
    "topk_kl",
    "topk_reverse_kl",
    "tvd",
    "uld",
    "unregister_divergence",
]
