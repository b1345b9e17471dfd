"""Same-architecture teacher ensembles as one vectorised call (``stack_module_state`` + ``vmap``)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state
from torch.utils._pytree import tree_map

from purekd.combinators import TeacherStage
from purekd.stages import Adapted, Split, adapt, detach, mean_logits


class Ensemble:
    """Several teachers of one architecture, evaluated together with ``torch.vmap``.

    ``ensemble(batch, **args)`` returns the list ``[model_k(batch, **args) for k]`` — by the
    forward conventions — computed in one vectorised call over stacked weights. The weights are
    a snapshot taken at construction (teachers are frozen); build a new ensemble if they
    change. ``randomness`` is passed to ``vmap`` (use ``'different'`` for dropout in train mode).
    """

    def __init__(self, models: Sequence[nn.Module], randomness: str = "error"):
        models = list(models)
        if not models:
            raise ValueError("an ensemble needs at least one model")
        kinds = {type(m) for m in models}
        if len(kinds) != 1:
            raise ValueError(f"an ensemble needs models of one architecture, got {sorted(k.__name__ for k in kinds)}")
        shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in models]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ValueError("ensemble members must have identical parameter names and shapes")
        self.size = len(models)
        self.params, self.buffers = stack_module_state(models)
        self.base = copy.deepcopy(models[0]).to("meta")
        self.randomness = randomness

    def __call__(self, batch: Any, **args: Any) -> list[Any]:
        def one(params: dict[str, Any], buffers: dict[str, Any]) -> Any:
            if isinstance(batch, Mapping):
                return functional_call(self.base, (params, buffers), (), {**batch, **args})
            return functional_call(self.base, (params, buffers), tuple(batch), args)

        with torch.no_grad():
            stacked = torch.vmap(one, randomness=self.randomness)(self.params, self.buffers)
        return [tree_map(lambda x, k=k: x[k] if isinstance(x, torch.Tensor) else x, stacked)
                for k in range(self.size)]


def ensemble_teachers(models: Sequence[nn.Module],
                      adaptors_T: Callable[[Any, Any], Any] | Sequence[Callable[[Any, Any], Any]],
                      randomness: str = "error") -> TeacherStage:
    """A teacher stage equal to :func:`~purekd.combinators.mean_of_teachers` over ``models``,
    with the forward passes done as one ``vmap`` call."""
    ensemble = Ensemble(models, randomness)
    adaptors = (list(adaptors_T) if isinstance(adaptors_T, Sequence)
                else [adaptors_T] * ensemble.size)
    if len(adaptors) != ensemble.size:
        raise ValueError(f"{ensemble.size} teachers but {len(adaptors)} adaptors")

    def teachers(split: Split, args: Mapping[str, Any]) -> Adapted:
        outputs = (list(split.teacher_cache) if split.teacher_cache is not None
                   else ensemble(split.teacher, **args))
        return mean_logits([detach(adapt(a, split.teacher, o))
                            for a, o in zip(adaptors, outputs, strict=True)])

    return teachers


__all__ = ["Ensemble", "ensemble_teachers"]
