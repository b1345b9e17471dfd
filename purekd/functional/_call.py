"""The step over explicit parameters, for ``torch.func`` transforms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from purekd.combinators import StepOutput

Params = dict[str, Tensor]


def trainable_params(step: nn.Module) -> Params:
    """The step's trainable tensors (student and projections), detached, by qualified name.

    These are the ``params`` that :func:`loss_and_terms` and :func:`functional_step` take.
    """
    return {name: p.detach() for name, p in step.named_parameters() if p.requires_grad}


def functional_step(step: nn.Module) -> Callable[..., StepOutput]:
    """``f(params, batch, **kwargs) == step(batch, **kwargs)`` with ``params`` swapped in.

    ``params`` maps parameter names (as in :func:`trainable_params`) to tensors; names left out
    keep the module's own tensors. Runs ``torch.func.functional_call``, so the step's loss path
    runs eagerly inside ``torch.func`` transforms.
    """

    def call(params: Params, batch: Any, **kwargs: Any) -> StepOutput:
        result: StepOutput = functional_call(step, params, (batch,), kwargs, strict=False)
        return result

    return call


def loss_and_terms(step: nn.Module) -> Callable[..., tuple[Tensor, dict[str, Tensor]]]:
    """``f(params, batch, **kwargs) -> (loss, terms)``, ready for
    ``torch.func.grad_and_value(f, has_aux=True)``:

    >>> grads, (loss, terms) = torch.func.grad_and_value(loss_and_terms(step), has_aux=True)(
    ...     trainable_params(step), batch)  # doctest: +SKIP
    """
    call = functional_step(step)

    def f(params: Params, batch: Any, **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        out = call(params, batch, **kwargs)
        return out.loss, out.terms

    return f


def sgd_update(params: Params, grads: Params, lr: float) -> Params:
    """``p - lr * g`` for each parameter: a pure SGD step on explicit parameters."""
    return {name: p - lr * grads[name] for name, p in params.items()}


def load_params(module: nn.Module, params: Params) -> None:
    """Copy ``params`` into ``module``'s parameters in place (no autograd)."""
    named = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            named[name].copy_(value)


__all__ = ["Params", "functional_step", "load_params", "loss_and_terms", "sgd_update",
           "trainable_params"]
