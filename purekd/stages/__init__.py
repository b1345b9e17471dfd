"""Layer 3 — pipeline stages: pure functions from a batch to normalised model outputs.

``batch_split`` → ``forward`` → ``adapt`` (→ :class:`Adapted`), plus ``probability_shift`` and
the shape checks that run before the loss path; ``next_token`` aligns a causal language model's
logits with the tokens they predict; ``rollout`` samples completions of prompts (through a
:class:`Sampler`, e.g. :class:`HFGenerateSampler`) for on-policy distillation.
"""

from ._adapt import (
    Adapted,
    AdaptorError,
    adapt,
    detach,
    mean_logits,
    normalise,
    share_equal_masks,
)
from ._forward import forward
from ._next_token import IGNORE_INDEX, NextToken, next_token, shift_left
from ._probability_shift import probability_shift
from ._rollout import (
    Rollout,
    check_context,
    check_prompts,
    check_same_tokenizer,
    completion_rows,
    rollout,
    sampling_mode,
)
from ._sampler import HFGenerateSampler, Sample, Sampler, completion_mask
from ._split import Split, batch_split

__all__ = [
    "IGNORE_INDEX",
    "Adapted",
    "AdaptorError",
    "HFGenerateSampler",
    "NextToken",
    "Rollout",
    "Sample",
    "Sampler",
    "Split",
    "adapt",
    "batch_split",
    "check_context",
    "check_prompts",
    "check_same_tokenizer",
    "completion_mask",
    "completion_rows",
    "detach",
    "forward",
    "mean_logits",
    "next_token",
    "normalise",
    "probability_shift",
    "rollout",
    "sampling_mode",
    "share_equal_masks",
    "shift_left",
]
