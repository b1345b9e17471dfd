"""``Step``: one distillation step as a module — models stage, checks, (compiled) loss path."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from purekd.stages import Adapted
from purekd.terms import make_context

from ._models import Outputs
from ._objective import LossFn, StepOutput


class Step(nn.Module):
    """``step(batch, *, progress=0.0, step=0, teacher_outputs=None, **model_args) -> StepOutput``.

    1. ``outputs(batch, teacher_outputs=..., **model_args)`` runs the models and adaptors
       (teacher without autograd) and returns :class:`Outputs`;
    2. ``loss.check(student, teacher)`` validates shapes and indices eagerly, raising a
       ``ValueError`` before anything is differentiated;
    3. ``loss(student, teacher, ctx)`` — the hot path, usually :func:`compiled` — returns
       ``StepOutput(loss, terms)``; ``progress`` and ``step`` enter it as 0-dim tensors.

    The step is an :class:`torch.nn.Module` whose parameters are exactly what training updates:
    the student's and the projections' (``step.projections``); teachers are held but not
    registered. Pass ``step.parameters()`` to an optimizer, wrap it in DDP, or call it through
    :func:`torch.func.functional_call`. It never changes a model's train/eval mode, a config, or
    its inputs.
    """

    projection_options: list[dict[str, Any] | None]
    """Optimizer options per intermediate match (``proj[3]``), ``None`` where there is no projection."""
    projection_groups: list[dict[str, Any]]
    """Optimizer options for each module in ``projections``, in the same order (``proj[3]`` of
    an intermediate match, ``proj_group`` of a custom match)."""

    def __init__(
        self,
        *,
        student: nn.Module,
        outputs: Callable[..., Outputs],
        loss: LossFn,
        projections: nn.ModuleList | None = None,
        teachers: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.student = student
        self.projections = projections if projections is not None else nn.ModuleList()
        self.outputs = outputs
        self.loss = loss
        self._teachers = dict(teachers or {})  # a plain dict: not registered, not trained
        self.projection_options = []
        self.projection_groups = [{} for _ in self.projections]

    @property
    def teachers(self) -> dict[str, Any]:
        """The teacher model(s), by name (not registered as submodules)."""
        return dict(self._teachers)

    def _device(self) -> torch.device:
        for tensor in self.student.parameters():
            return tensor.device
        return torch.device("cpu")

    def check(self, outputs: Outputs) -> None:
        """Run the loss path's preconditions on ``outputs``."""
        check = getattr(self.loss, "check", None)
        if check is not None:
            check(outputs.student, outputs.teacher)

    def forward(
        self,
        batch: Any,
        *,
        progress: float | Tensor = 0.0,
        step: int | Tensor = 0,
        teacher_outputs: Adapted | None = None,
        **model_args: Any,
    ) -> StepOutput:
        outputs = self.outputs(batch, teacher_outputs=teacher_outputs, **model_args)
        self.check(outputs)
        ctx = make_context(progress, step, device=self._device())
        result: StepOutput = self.loss(outputs.student, outputs.teacher, ctx)
        return result


__all__ = ["Step"]
