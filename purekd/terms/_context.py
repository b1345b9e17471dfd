"""What a loss term is, and the context it sees besides the two models' outputs."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from purekd.stages import Adapted


class Context(NamedTuple):
    """Training position, as 0-dim tensors so compiled code never recompiles for a new value.

    ``progress`` is the fraction of training done, in ``[0, 1]``: ``global_step / total_steps``.
    ``step`` is the global (optimizer) step.
    """

    progress: Tensor
    step: Tensor


def check_progress(progress: Any) -> None:
    """``progress`` must be a finite number in ``[0, 1]`` (a fraction of training done).

    A 0-dim tensor is checked too when it lives on the CPU (reading a GPU tensor would
    synchronise every step); anything else raises ``ValueError`` with the usual formula.
    """
    if isinstance(progress, Tensor):
        if progress.dim() != 0:
            raise ValueError(f"progress must be a number or a 0-dim tensor, got a tensor of shape "
                             f"{tuple(progress.shape)}")
        if progress.device.type != "cpu" or progress.requires_grad:
            return
        value = float(progress)
    elif isinstance(progress, bool) or not isinstance(progress, (int, float)):
        raise TypeError(f"progress must be a number in [0, 1], got {type(progress).__name__}")
    else:
        value = float(progress)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(
            f"progress={value!r} is outside [0, 1]: progress is the fraction of training done, "
            "global_step / total_steps (count optimizer steps, not micro-batches or epochs); "
            "scheduled weights and temperatures are defined only on [0, 1]"
        )


def make_context(progress: float | Tensor = 0.0, step: int | Tensor = 0,
                 device: torch.device | str | None = None) -> Context:
    """A :class:`Context` from Python numbers or tensors (tensors are passed through).

    Raises ``ValueError`` when ``progress`` is outside ``[0, 1]`` (:func:`check_progress`).
    """
    check_progress(progress)
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


class _TermFields(NamedTuple):
    fn: TermFn
    weight: Weight = 1.0
    check: Check = _no_check
    name: str = ""
    modules: tuple[nn.Module, ...] = ()
    kept_rows: Count | None = None


class Term(_TermFields):
    """A named loss term with its weight, its precondition and its trainable modules.

    Calling it, ``term(adapted_S, adapted_T, ctx)``, returns the *unweighted* loss as
    ``{name: 0-dim tensor}``, or ``{}`` when the term does not apply to these outputs.

    * ``weight`` (a float or a schedule of progress) multiplies it in the total;
    * ``check(adapted_S, adapted_T)`` validates shapes and indices eagerly, outside compiled
      code, so bad outputs raise a clear ``ValueError`` before any backward pass;
    * ``name`` (default: ``fn.__name__``) is the key of its value in ``StepOutput.terms`` and in
      the metrics, and the handle to look it up, re-weight, replace or drop it in an
      :class:`~purekd.combinators.Objective`;
    * ``modules``: modules the term trains (e.g. a projection); a :class:`~purekd.Step` adds
      their parameters to ``step.parameters()``;
    * ``kept_rows`` (or ``None``): ``(adapted_S, adapted_T) -> 0-dim Tensor``, the number of rows
      (tokens) the term's mean is over, for token-correct normalisation across micro-batches
      (:func:`~purekd.combinators.token_share`).
    """

    __slots__ = ()

    def __new__(cls, fn: TermFn, weight: Weight = 1.0, check: Check = _no_check,
                name: str = "", modules: Iterable[nn.Module] = (),
                kept_rows: Count | None = None) -> Term:
        if not callable(fn):
            raise TypeError(f"Term(fn=...): a term function must be callable, got "
                            f"{type(fn).__name__}")
        if not name:
            name = str(getattr(fn, "__name__", "") or type(fn).__name__)
        if not isinstance(name, str):
            raise TypeError(f"Term(name={name!r}): a term's name must be a string")
        if isinstance(modules, nn.Module):
            modules = (modules,)
        modules = tuple(modules)
        for module in modules:
            if not isinstance(module, nn.Module):
                raise TypeError(f"Term {name!r}: modules must be nn.Module instances, got "
                                f"{type(module).__name__}")
        return super().__new__(cls, fn, weight, check, name, modules, kept_rows)

    def _replace(self, **changes: Any) -> Term:
        values = self._asdict()
        unknown = set(changes) - set(values)
        if unknown:
            raise ValueError(f"Term has no field(s) {sorted(unknown)}; fields: {self._fields}")
        values.update(changes)
        return type(self)(**values)

    def __call__(self, adapted_S: Adapted, adapted_T: Adapted, ctx: Context) -> dict[str, Tensor]:
        return self.fn(adapted_S, adapted_T, ctx)


def as_term(term: Term | TermFn, name: str | None = None) -> Term:
    """A plain term function as a :class:`Term` of weight 1 with no check, named ``name`` (by
    default the function's ``__name__``); a :class:`Term` is returned as it is (renamed when
    ``name`` is given)."""
    if isinstance(term, Term):
        return term if name is None else term._replace(name=name)
    return Term(term, name=name or "")


__all__ = ["Check", "Context", "Count", "Term", "TermFn", "Weight", "as_term", "check_progress",
           "make_context"]
