"""``route_by_task``: one step per task, sharing the student (MultiTaskDistiller)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ._objective import StepOutput
from ._step import Step


class TaskRouter(nn.Module):
    """``router(batch, task, **kwargs) == steps[task](batch, **kwargs)``.

    The steps normally share one student and one set of projections; ``parameters()`` lists
    each shared tensor once.
    """

    def __init__(self, steps: Mapping[str, Step]):
        super().__init__()
        if not steps:
            raise ValueError("route_by_task needs at least one task")
        self.steps = nn.ModuleDict(dict(steps))

    @property
    def tasks(self) -> list[str]:
        return list(self.steps.keys())

    @property
    def projections(self) -> nn.ModuleList:
        """The projections of the first task's step (shared by all tasks when built by
        :func:`~purekd.make_step`)."""
        first: Step = next(iter(self.steps.values()))  # type: ignore[assignment]
        return first.projections

    def _each(self, edit: Any) -> TaskRouter:
        return TaskRouter({task: edit(step) for task, step in self.steps.items()})

    def reweight(self, name: str, weight: Any) -> TaskRouter:
        """Every task's step with the term named ``name`` re-weighted (:meth:`Step.reweight`)."""
        return self._each(lambda step: step.reweight(name, weight))

    def replace_term(self, name: str, term: Any) -> TaskRouter:
        """Every task's step with ``term`` in place of the term named ``name``."""
        return self._each(lambda step: step.replace_term(name, term))

    def drop_terms(self, *names: str) -> TaskRouter:
        """Every task's step without the terms named ``names``."""
        return self._each(lambda step: step.drop_terms(*names))

    def add_terms(self, *terms: Any) -> TaskRouter:
        """Every task's step with ``terms`` added."""
        return self._each(lambda step: step.add_terms(*terms))

    def forward(self, batch: Any, task: str, **kwargs: Any) -> StepOutput:
        if task not in self.steps:
            raise ValueError(f"unknown task {task!r}; known tasks: {self.tasks}")
        result: StepOutput = self.steps[task](batch, **kwargs)
        return result


def route_by_task(steps: Mapping[str, Step]) -> TaskRouter:
    """Route each ``(batch, task)`` to the step of its task."""
    return TaskRouter(steps)


__all__ = ["TaskRouter", "route_by_task"]
