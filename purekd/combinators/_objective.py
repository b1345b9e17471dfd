"""Summing named terms into a loss, and weighting terms by constants or schedules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from purekd.stages import Adapted
from purekd.terms import Context, Term, TermFn, Weight, as_term


class StepOutput(NamedTuple):
    """What a step returns: ``loss`` (0-dim, differentiable) = ``sum_k w_k * terms[k]``, and the
    *unweighted* named ``terms``.

    ``tokens`` is ``None`` for TextBrewer's per-batch normalisation. In a token-normalised step
    it is the number of rows (tokens) the token-level loss averages over in this batch, a 0-dim
    float tensor: over several micro-batches (gradient accumulation, data parallelism) the
    optimizer step's loss is ``sum_m loss_m * tokens_m / sum_m tokens_m``
    (:func:`~purekd.combinators.token_share`), which equals the loss of one batch holding every
    token, instead of the mean of per-batch means.
    """

    loss: Tensor
    terms: dict[str, Tensor]
    tokens: Tensor | None = None


LossFn = Callable[[Adapted, Adapted, Context], StepOutput]


def evaluate_weight(weight: Weight, progress: Any) -> Any:
    """A weight's value at ``progress``: the constant itself, or ``schedule(progress)``."""
    return weight(progress) if callable(weight) else weight


def _product(a: Weight, b: Weight) -> Weight:
    if not callable(a) and not callable(b):
        return a * b

    def product(progress: Any) -> Any:
        return evaluate_weight(a, progress) * evaluate_weight(b, progress)

    return product


def weighted(term: Term | TermFn, weight: Weight) -> Term:
    """``term`` with its weight multiplied by ``weight`` (a constant or a schedule of progress).

    >>> from purekd.schedules import linear_decay
    >>> kd = weighted(logits_kd(), linear_decay)   # 1 -> 0 over training  # doctest: +SKIP
    """
    base = as_term(term)
    return base._replace(weight=_product(base.weight, weight))


def scheduled_after_start(base: float, schedule: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """TextBrewer's scheduled weight: ``base`` at progress 0, ``schedule(progress)`` after.

    TextBrewer starts with the configured weight and overwrites it with the schedule's value
    after each optimizer step, so the first step uses ``base``.
    """

    def weight(progress: Any) -> Any:
        if isinstance(progress, Tensor):
            return torch.where(progress == 0, torch.full_like(progress, base), schedule(progress))
        return base if progress == 0 else schedule(progress)

    weight.__qualname__ = f"scheduled_after_start({base!r}, {getattr(schedule, '__qualname__', schedule)})"
    return weight


class Objective(NamedTuple):
    """The weighted sum of named terms; duplicate names are an error.

    ``objective(S, T, ctx)`` returns :class:`StepOutput`; ``objective.check(S, T)`` runs every
    term's precondition (eagerly, before the loss path).
    """

    terms: tuple[Term, ...]
    count_tokens: bool = False

    def __call__(self, adapted_S: Adapted, adapted_T: Adapted, ctx: Context) -> StepOutput:
        named: dict[str, Tensor] = {}
        total: Tensor | None = None
        tokens: Tensor | None = None
        for term in self.terms:
            if self.count_tokens and tokens is None and term.kept_rows is not None:
                tokens = term.kept_rows(adapted_S, adapted_T)
            values = term(adapted_S, adapted_T, ctx)
            if not values:
                continue
            weight = evaluate_weight(term.weight, ctx.progress)
            for name, value in values.items():
                if name in named:
                    raise ValueError(
                        f"two terms are both named {name!r}; give each term a distinct name"
                    )
                named[name] = value
                contribution = value * weight
                total = contribution if total is None else total + contribution
        if total is None:
            raise ValueError(
                "no loss term applies to these outputs: return 'logits' from both adaptors, "
                "'losses' from the student's, or configure intermediate matches"
            )
        return StepOutput(total, named, tokens)

    def check(self, adapted_S: Adapted, adapted_T: Adapted) -> None:
        for term in self.terms:
            term.check(adapted_S, adapted_T)


def objective(*terms: Term | TermFn, count_tokens: bool = False) -> Objective:
    """Sum terms: ``loss = sum_k w_k(progress) * value_k``, ``terms = {name_k: value_k}``.

    ``count_tokens``: the output's ``tokens`` is the row count of the first term that has one
    (:attr:`Term.kept_rows`, e.g. the KD term's kept tokens), for token-correct normalisation.
    """
    return Objective(tuple(as_term(t) for t in terms), count_tokens)


__all__ = ["LossFn", "Objective", "StepOutput", "evaluate_weight", "objective",
           "scheduled_after_start", "weighted"]
