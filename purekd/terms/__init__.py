"""Layer 3 — loss terms: ``(adapted_S, adapted_T, ctx) -> {name: unweighted loss}``.

Each builder returns a :class:`Term`: the term function, its weight (a constant or a schedule
of progress) and an eager precondition check.

Imports: stages (3), schedules (2), losses (1) and the leaf helpers (``purekd._masked``);
never the presets, the configs, the runner or the facade (``tests/test_layers.py``).
"""

from ._context import Check, Context, Count, Term, TermFn, Weight, as_term, make_context
from ._cross_tokenizer_kd import cross_tokenizer_kd
from ._hard_label import hard_label
from ._logits_kd import check_logits, kd_loss_caller, logits_kd, logits_mask_for
from ._match import custom_match, intermediate_match, match_name, select_layers
from ._sampled_kd import sampled_token_kd
from ._token_kd import token_kd

__all__ = [
    "Check",
    "Context",
    "Count",
    "Term",
    "TermFn",
    "Weight",
    "as_term",
    "check_logits",
    "cross_tokenizer_kd",
    "custom_match",
    "hard_label",
    "intermediate_match",
    "kd_loss_caller",
    "logits_kd",
    "logits_mask_for",
    "make_context",
    "match_name",
    "sampled_token_kd",
    "select_layers",
    "token_kd",
]
