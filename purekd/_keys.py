"""The names of the keys an adaptor's dict may hold: a leaf module (no imports), so that the
stages can validate adaptor outputs without importing :mod:`purekd.presets` and, through it,
every loss, schedule and projection. :mod:`purekd.presets` re-exports these names."""

from __future__ import annotations

FEATURES: list[str] = ["hidden", "attention"]
"""Intermediate features an adaptor may return, each a list of per-layer tensors."""

LM_KEYS: list[str] = ["lm_hidden", "lm_weight", "lm_bias"]
"""Adaptor keys of a fused output layer: the final hidden states ``lm_hidden`` ``(*rows, H)``,
the output layer's ``lm_weight`` ``(V, H)`` and optional ``lm_bias`` ``(V,)``; given instead of
``logits``, the KD loss is computed without materialising ``(rows, V)`` logits."""

TOPK_KEYS: list[str] = ["topk_ids", "topk_logprobs", "topk_mask", "topk_next_logprobs",
                        "topk_vocab_size"]
"""Adaptor keys of a teacher's top-k distribution (e.g. from a top-k cache): ``topk_ids``
``(*rows, k)``, ``topk_logprobs`` ``(*rows, k)`` (log-softmax at temperature 1), optional
``topk_mask`` ``rows`` 0/1; given instead of the teacher's ``logits``. A cross-tokenizer cache
adds ``topk_next_logprobs`` ``rows`` (the log-probability of the token following each row in
the teacher's own sequence) and ``topk_vocab_size`` (an int: the teacher's vocabulary)."""

ADAPTOR_KEYS: list[str] = ["logits", "logits_mask", "losses", "inputs_mask", "labels", *FEATURES,
                           *LM_KEYS, *TOPK_KEYS]
"""Keys an adaptor's dict may contain (TextBrewer's, then the language-model ones)."""

__all__ = ["ADAPTOR_KEYS", "FEATURES", "LM_KEYS", "TOPK_KEYS"]
