"""Layer 3 — pipeline stages: pure functions from a batch to normalised model outputs.

``batch_split`` → ``forward`` → ``adapt`` (→ :class:`Adapted`), plus ``probability_shift`` and
the shape checks that run before the loss path; ``next_token`` aligns a causal language model's
logits with the tokens they predict; ``rollout`` samples completions of prompts (through a
:class:`Sampler`, e.g. :class:`HFGenerateSampler`) for on-policy distillation; ``align_spans``,
``vocabulary_map`` and ``CrossTokenizerCollator`` serve a teacher and a student with different
tokenizers, and ``retokenise_rollout`` turns an on-policy rollout into such a batch.

Imports: the layers above (``purekd.losses``: the aligned-span record the cross-tokenizer
losses take), the leaf ``purekd._keys`` (the adaptor key names), the leaf
``purekd._sharded`` (an FSDP2-sharded output layer gathered whole) and the leaf
``purekd._collectives`` (the samplers' lockstep across ranks) (``tests/test_layers.py``).
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
from ._align import EndOfText, align_spans, batches_without_spans, end_of_text, token_spans
from ._cross_batches import (
    CrossTokenizerCollator,
    align_batches,
    check_offsets_support,
    check_same_texts,
)
from ._cross_rollout import (
    CrossRollout,
    check_tokenizers_fit,
    decode_with_offsets,
    prompts_for,
    retokenise_rollout,
    stop_pairs,
)
from ._forward import forward
from ._next_token import IGNORE_INDEX, NextToken, next_token, shift_left
from ._probability_shift import probability_shift
from ._rollout import (
    Rollout,
    check_context,
    check_prompts,
    check_same_tokenizer,
    check_same_vocabulary,
    completion_rows,
    rollout,
    sampling_mode,
    vocabulary_rows,
)
from ._sampler import HFGenerateSampler, KVCacheSampler, Sample, Sampler, completion_mask
from ._split import Split, batch_split
from ._tied_embedding import output_weight, sparse_tied_embedding, tied_input_embedding
from ._vocabulary import (
    match_vocabularies,
    normalise_token,
    tokenizer_scheme,
    vocabulary_map,
)

__all__ = [
    "IGNORE_INDEX",
    "Adapted",
    "AdaptorError",
    "CrossRollout",
    "CrossTokenizerCollator",
    "EndOfText",
    "HFGenerateSampler",
    "KVCacheSampler",
    "NextToken",
    "Rollout",
    "Sample",
    "Sampler",
    "Split",
    "adapt",
    "align_batches",
    "align_spans",
    "batch_split",
    "batches_without_spans",
    "check_context",
    "check_offsets_support",
    "check_prompts",
    "check_same_texts",
    "check_same_tokenizer",
    "check_same_vocabulary",
    "check_tokenizers_fit",
    "completion_mask",
    "completion_rows",
    "decode_with_offsets",
    "detach",
    "end_of_text",
    "forward",
    "match_vocabularies",
    "mean_logits",
    "next_token",
    "normalise",
    "normalise_token",
    "output_weight",
    "probability_shift",
    "prompts_for",
    "retokenise_rollout",
    "rollout",
    "sampling_mode",
    "share_equal_masks",
    "shift_left",
    "sparse_tied_embedding",
    "stop_pairs",
    "tied_input_embedding",
    "token_spans",
    "tokenizer_scheme",
    "vocabulary_map",
    "vocabulary_rows",
]
