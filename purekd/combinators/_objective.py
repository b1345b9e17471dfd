"""Summing named terms into a loss, and weighting terms by constants or schedules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

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


def _check_value(term: Term, values: Any) -> None:
    """A term's output must be ``{}`` or ``{term.name: 0-dim floating tensor}``.

    The conditions are on types and static shapes only, so under ``torch.compile`` they are
    decided while tracing (no graph break) and an error surfaces eagerly, naming the term.
    """
    if not isinstance(values, dict):
        raise TypeError(
            f"term {term.name!r} returned a {type(values).__name__}; a term returns a dict "
            f"{{{term.name!r}: loss}} with a 0-dim loss (or {{}} when it does not apply): "
            f"write `return {{{term.name!r}: value}}`"
        )
    for name, value in values.items():
        if name != term.name:
            raise ValueError(
                f"term {term.name!r} returned the name {name!r}; a term returns its value under "
                f"its own name (the name in StepOutput.terms and in the metrics): return "
                f"{{{term.name!r}: value}}, or name the term Term(fn, name={name!r})"
            )
        if not isinstance(value, Tensor):
            raise TypeError(f"term {term.name!r} returned a {type(value).__name__} for "
                            f"{name!r}; a term's value is a 0-dim tensor")
        if value.dim() != 0:
            raise ValueError(
                f"term {term.name!r} returned a tensor of shape {tuple(value.shape)}; a term's "
                "value must be a 0-dim loss: reduce it (e.g. .mean() over the batch) inside the "
                "term"
            )
        if not value.is_floating_point():
            raise TypeError(f"term {term.name!r} returned a {value.dtype} tensor; a loss must "
                            "be a floating-point tensor")


def _unique_names(terms: tuple[Term, ...]) -> None:
    seen: set[str] = set()
    for term in terms:
        if term.name in seen:
            raise ValueError(
                f"two terms are both named {term.name!r}; give each term a distinct name "
                f"(logits_kd(name=...), hard_label(name=...), Term(fn, name=...), or "
                "as_term(fn, name=...))"
            )
        seen.add(term.name)


class Objective:
    """The weighted sum of named terms: ``loss = sum_k w_k(progress) * value_k``.

    ``objective(S, T, ctx)`` returns :class:`StepOutput` with ``terms = {name_k: value_k}``;
    ``objective.check(S, T)`` runs every term's precondition (eagerly, before the loss path).
    Every term's output is checked too (a dict ``{name: 0-dim tensor}``), with an error naming
    the term.

    Terms are addressed by name, as in optax's ``named_chain`` (duplicate names are an error)::

        objective.names                        # ('kd_loss', ..., 'hard_label_loss')
        objective["kd_loss"]                   # the Term
        objective.reweight("kd_loss", 0.5)     # a new Objective; the term's weight is now 0.5
        objective.scale("kd_loss", 2.0)        # ... multiplied by 2 (constants or schedules)
        objective.replace("kd_loss", term)     # ... that term in its place (named as given)
        objective.drop("hard_label_loss")      # ... without it
        objective.add(term, ...)               # ... with more terms at the end

    An Objective is immutable: each edit returns a new one.
    """

    __slots__ = ("count_tokens", "terms")
    terms: tuple[Term, ...]
    count_tokens: bool

    def __init__(self, terms: Any, *, count_tokens: bool = False):
        built = tuple(as_term(t) for t in terms)
        _unique_names(built)
        object.__setattr__(self, "terms", built)
        object.__setattr__(self, "count_tokens", bool(count_tokens))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("an Objective is immutable: reweight/replace/drop/add return a new one")

    def __repr__(self) -> str:
        return f"Objective({list(self.names)})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Objective) and self.terms == other.terms
                and self.count_tokens == other.count_tokens)

    def __hash__(self) -> int:
        return hash((self.terms, self.count_tokens))

    def __reduce__(self) -> Any:
        return (_rebuild, (self.terms, self.count_tokens))

    @property
    def names(self) -> tuple[str, ...]:
        """The terms' names, in order."""
        return tuple(term.name for term in self.terms)

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        """Every term's trainable modules (each once, in term order)."""
        found: dict[int, nn.Module] = {}
        for term in self.terms:
            for module in term.modules:
                found.setdefault(id(module), module)
        return tuple(found.values())

    def _index(self, name: str) -> int:
        for index, term in enumerate(self.terms):
            if term.name == name:
                return index
        raise KeyError(f"no term named {name!r}; the terms are {list(self.names)}")

    def __getitem__(self, name: str) -> Term:
        if not isinstance(name, str):
            raise TypeError(f"look a term up by its name (a str), got {type(name).__name__}; "
                            "the terms are in .terms")
        return self.terms[self._index(name)]

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def _with(self, index: int, term: Term | None) -> Objective:
        terms = list(self.terms)
        if term is None:
            del terms[index]
        else:
            terms[index] = term
        return Objective(terms, count_tokens=self.count_tokens)

    def replace(self, name: str, term: Term | TermFn) -> Objective:
        """The objective with ``term`` in place of the term named ``name``."""
        return self._with(self._index(name), as_term(term))

    def reweight(self, name: str, weight: Weight) -> Objective:
        """The objective with the term named ``name`` weighted by ``weight`` instead."""
        index = self._index(name)
        return self._with(index, self.terms[index]._replace(weight=weight))

    def scale(self, name: str, weight: Weight) -> Objective:
        """The objective with the term named ``name``'s weight multiplied by ``weight``."""
        index = self._index(name)
        return self._with(index, weighted(self.terms[index], weight))

    def drop(self, *names: str) -> Objective:
        """The objective without the terms named ``names``."""
        for name in names:
            self._index(name)
        return Objective((t for t in self.terms if t.name not in names),
                         count_tokens=self.count_tokens)

    def add(self, *terms: Term | TermFn) -> Objective:
        """The objective with ``terms`` appended."""
        return Objective((*self.terms, *terms), count_tokens=self.count_tokens)

    def __call__(self, adapted_S: Adapted, adapted_T: Adapted, ctx: Context) -> StepOutput:
        named: dict[str, Tensor] = {}
        total: Tensor | None = None
        tokens: Tensor | None = None
        for term in self.terms:
            if self.count_tokens and tokens is None and term.kept_rows is not None:
                tokens = term.kept_rows(adapted_S, adapted_T)
            values = term(adapted_S, adapted_T, ctx)
            _check_value(term, values)
            if not values:
                continue
            weight = evaluate_weight(term.weight, ctx.progress)
            value = values[term.name]
            named[term.name] = value
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


def _rebuild(terms: tuple[Term, ...], count_tokens: bool) -> Objective:
    return Objective(terms, count_tokens=count_tokens)


def objective(*terms: Term | TermFn, count_tokens: bool = False) -> Objective:
    """Sum terms: ``loss = sum_k w_k(progress) * value_k``, ``terms = {name_k: value_k}``.

    Plain functions become terms named by their ``__name__``; duplicate names raise
    ``ValueError``. ``count_tokens``: the output's ``tokens`` is the row count of the first
    term that has one (:attr:`Term.kept_rows`, e.g. the KD term's kept tokens), for
    token-correct normalisation.
    """
    return Objective(terms, count_tokens=count_tokens)


__all__ = ["LossFn", "Objective", "StepOutput", "evaluate_weight", "objective",
           "scheduled_after_start", "weighted"]
