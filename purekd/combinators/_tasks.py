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

    def forward(self, batch: Any, task: str, **kwargs: Any) -> StepOutput:
        if task not in self.steps:
            raise ValueError(f"unknown task {task!r}; known tasks: {self.tasks}")
        result: StepOutput = self.steps[task](batch, **kwargs)
        return result


def route_by_task(steps: Mapping[str, Step]) -> TaskRouter:
    """Route each ``(batch, task)`` to the step of its task."""
    return TaskRouter(steps)


__all__ = ["TaskRouter", "route_by_task"]
