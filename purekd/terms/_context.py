"""What a loss term is, and the context it sees besides the two models' outputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from purekd.stages import Adapted


class Context(NamedTuple):
    """Training position, as 0-dim tensors so compiled code never recompiles for a new value.

    ``progress`` is the fraction of training done, in ``[0, 1]``: ``global_step / total_steps``.
    ``step`` is the global (optimizer) step.
    """

    progress: Tensor
    step: Tensor


def make_context(progress: float | Tensor = 0.0, step: int | Tensor = 0,
                 device: torch.device | str | None = None) -> Context:
    """A :class:`Context` from Python numbers or tensors (tensors are passed through)."""
    return Context(
        torch.as_tensor(progress, dtype=torch.float32, device=device),
        torch.as_tensor(step, dtype=torch.int64, device=device),
    )


TermFn = Callable[[Adapted, Adapted, Context], dict[str, Tensor]]
"""A loss term function: ``(adapted_S, adapted_T, ctx) -> {name: unweighted 0-dim loss}``.

A term that does not apply to the outputs it is given (no logits, no ``losses``) returns ``{}``.
"""

Check = Callable[[Adapted, Adapted], None]
"""A precondition on the outputs, run eagerly before the loss path; raises ``ValueError``."""

Weight = float | Callable[[Any], Any]
"""A constant weight, or a schedule ``progress -> weight``."""

Count = Callable[[Adapted, Adapted], "Tensor | None"]
"""How many rows (tokens) a token-level term averages over: ``(adapted_S, adapted_T) -> 0-dim
Tensor`` (``None`` when the term does not apply); runs in the loss path."""


def _no_check(adapted_S: Adapted, adapted_T: Adapted) -> None:
    del adapted_S, adapted_T


class Term(NamedTuple):
    """A loss term with its weight and its precondition.

    Calling it, ``term(adapted_S, adapted_T, ctx)``, returns the *unweighted* named losses.
    ``weight`` (a float or a schedule of progress) multiplies each of them in the total;
    ``check(adapted_S, adapted_T)`` validates shapes and indices eagerly, outside compiled code,
    so bad outputs raise a clear ``ValueError`` before any backward pass. ``kept_rows`` (or ``None``)
    gives the number of rows the term's mean is over, for token-correct normalisation across
    micro-batches (:func:`~purekd.combinators.token_share`).
    """

    fn: TermFn
    weight: Weight = 1.0
    check: Check = _no_check
    kept_rows: Count | None = None

    def __call__(self, adapted_S: Adapted, adapted_T: Adapted, ctx: Context) -> dict[str, Tensor]:
        return self.fn(adapted_S, adapted_T, ctx)


def as_term(term: Term | TermFn) -> Term:
    """A plain term function as a :class:`Term` of weight 1 with no check."""
    return term if isinstance(term, Term) else Term(term)


__all__ = ["Check", "Context", "Count", "Term", "TermFn", "Weight", "as_term", "make_context"]
