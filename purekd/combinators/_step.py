"""``Step``: one distillation step as a module — models stage, checks, (compiled) loss path."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from purekd._compiling import Compiled
from purekd.stages import Adapted
from purekd.terms import Term, TermFn, Weight, make_context

from ._models import Outputs
from ._objective import LossFn, Objective, StepOutput
from ._on_policy import on_policy_stage


def _loss_modules(loss: Any) -> tuple[nn.Module, ...]:
    """The trainable modules a loss path's terms declare (``Term.modules``)."""
    modules = getattr(loss, "modules", ())
    return tuple(modules) if isinstance(modules, tuple) else ()


def _held_modules(fn: Any) -> list[nn.Module]:
    """Modules a term function holds in its closure or its default arguments."""
    cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())
             if c.cell_contents is not None] if hasattr(fn, "__closure__") else []
    cells += list(getattr(fn, "__defaults__", None) or ())
    return [v for v in cells if isinstance(v, nn.Module)]


class Step(nn.Module):
    """``step(batch, *, progress=0.0, step=0, teacher_outputs=None, **model_args) -> StepOutput``.

    1. ``outputs(batch, teacher_outputs=..., **model_args)`` runs the models and adaptors
       (teacher without autograd) and returns :class:`Outputs`;
    2. ``loss.check(student, teacher)`` validates shapes and indices eagerly, raising a
       ``ValueError`` before anything is differentiated;
    3. ``loss(student, teacher, ctx)`` — the hot path, usually :func:`compiled` — returns
       ``StepOutput(loss, terms)``; ``progress`` (in ``[0, 1]``) and ``step`` enter it as 0-dim
       tensors.

    One place owns each model: the student comes from ``outputs`` (a
    :func:`~purekd.combinators.models_stage`), so ``Step(outputs=models_stage(...), loss=...)``
    is enough (``student=`` may be given too, but must be the same module). The trainable
    modules of the loss path's terms (``Term.modules``: projections) join ``step.projections``
    without being listed.

    A models stage with a ``state`` module without parameters (the on-policy stage's generator)
    has it registered as ``step.outputs_state``, so ``step.state_dict()`` carries it.

    The step is an :class:`torch.nn.Module` whose parameters are exactly what training updates:
    the student's and the projections' (``step.projections``); teachers are held but not
    registered. Pass ``step.parameters()`` to an optimizer, wrap it in DDP, or call it through
    :func:`torch.func.functional_call`. It never changes a config or its inputs, nor a model's
    train/eval mode (an on-policy stage puts the sampling model in eval mode while it samples,
    and restores it).

    Terms are edited by name without taking the step apart: ``step.objective`` is the loss
    path's :class:`~purekd.combinators.Objective`; ``step.reweight(name, w)``,
    ``step.replace_term(name, term)``, ``step.drop_terms(*names)``, ``step.add_terms(*terms)``
    and ``step.with_objective(objective)`` return a new step with the same models, the loss path
    compiled as this one's was.
    """

    projection_options: list[dict[str, Any] | None]
    """Optimizer options per intermediate match (``proj[3]``), ``None`` where there is no projection."""
    projection_groups: list[dict[str, Any]]
    """Optimizer options for each module in ``projections``, in the same order (``proj[3]`` of
    an intermediate match, ``proj_group`` of a custom match; ``{}`` for a term's module)."""

    def __init__(
        self,
        *,
        outputs: Callable[..., Outputs],
        loss: LossFn,
        student: nn.Module | None = None,
        projections: nn.ModuleList | Iterable[nn.Module] | None = None,
        teachers: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        owned = getattr(outputs, "student", None)
        if student is None:
            if not isinstance(owned, nn.Module):
                raise TypeError(
                    "Step(outputs=...): this models stage does not say which model is the "
                    "student; build it with models_stage(teacher, student, adaptor), or pass "
                    "Step(student=...)")
            student = owned
        elif owned is not None and owned is not student:
            raise ValueError(
                "Step(student=...) is not the student the models stage runs "
                f"({type(owned).__name__} at {id(owned):#x}): the step would train one model and "
                "run another; leave student= out (Step takes it from models_stage)")
        if not isinstance(student, nn.Module):
            raise TypeError(f"Step(student=...): the student must be an nn.Module, got "
                            f"{type(student).__name__}")
        self.student = student
        listed = list(projections) if projections is not None else []
        for module in listed:
            if not isinstance(module, nn.Module):
                raise TypeError(f"Step(projections=...): expected nn.Modules, got "
                                f"{type(module).__name__}")
        known = {id(m) for m in listed}
        declared = [m for m in _loss_modules(loss) if id(m) not in known]
        # a ModuleList given as it is stays shared (the steps of route_by_task share one)
        self.projections = (projections if isinstance(projections, nn.ModuleList) and not declared
                            else nn.ModuleList(listed + declared))
        self.outputs = outputs
        state = getattr(outputs, "state", None)  # e.g. an on-policy stage's generator
        if isinstance(state, nn.Module) and not any(True for _ in state.parameters()):
            self.outputs_state = state
        self.loss = loss
        self._teachers = dict(teachers or {})  # a plain dict: not registered, not trained
        self.projection_options = []
        self.projection_groups = [{} for _ in self.projections]
        self._warn_untrained_modules()

    def _warn_untrained_modules(self) -> None:
        terms = getattr(self.loss, "terms", ())
        trained = {id(p) for p in self.parameters()}
        teachers = {id(p) for t in self._teachers.values() if isinstance(t, nn.Module)
                    for p in t.parameters()}
        for term in terms if isinstance(terms, tuple) else ():
            if not isinstance(term, Term):
                continue
            for module in _held_modules(term.fn):
                loose = [p for p in module.parameters() if p.requires_grad
                         and id(p) not in trained and id(p) not in teachers]
                if loose:
                    warnings.warn(
                        f"term {term.name!r} uses a {type(module).__name__} whose parameters are "
                        "not in step.parameters(), so training will not update them: declare it "
                        "as the term's module (Term(fn, ..., modules=(module,))) or pass it in "
                        "Step(projections=...); if it is meant to stay fixed, freeze it "
                        "(module.requires_grad_(False))",
                        UserWarning, stacklevel=3)

    @property
    def samples_rollouts(self) -> bool:
        """Whether the step samples completions itself (an on-policy stage runs in it): its
        teacher must then score sequences that no dataset or cache holds."""
        return on_policy_stage(self) is not None

    @property
    def teachers(self) -> dict[str, Any]:
        """The teacher model(s), by name (not registered as submodules)."""
        return dict(self._teachers)

    @property
    def objective(self) -> Objective:
        """The loss path's :class:`~purekd.combinators.Objective` (under its compilation)."""
        loss = self.loss.eager if isinstance(self.loss, Compiled) else self.loss
        if not isinstance(loss, Objective):
            raise TypeError(f"this step's loss path is a {type(loss).__name__}, not an Objective "
                            "built by objective(...), so its terms cannot be edited by name")
        return loss

    def with_objective(self, objective: Objective) -> Step:
        """A step with the same models stage, student and projections, and ``objective`` as its
        loss path (compiled as this step's is)."""
        loss: LossFn = (self.loss.like(objective) if isinstance(self.loss, Compiled)
                        else objective)
        step = Step(outputs=self.outputs, loss=loss, student=self.student,
                    projections=list(self.projections), teachers=self._teachers)
        groups = {id(m): g for m, g in zip(self.projections, self.projection_groups,
                                           strict=True)}
        step.projection_groups = [groups.get(id(m), {}) for m in step.projections]
        step.projection_options = list(self.projection_options)
        return step

    def reweight(self, name: str, weight: Weight) -> Step:
        """The step with the term named ``name`` weighted by ``weight`` (a constant or a
        schedule of progress) instead."""
        return self.with_objective(self.objective.reweight(name, weight))

    def replace_term(self, name: str, term: Term | TermFn) -> Step:
        """The step with ``term`` in place of the term named ``name``."""
        return self.with_objective(self.objective.replace(name, term))

    def drop_terms(self, *names: str) -> Step:
        """The step without the terms named ``names``."""
        return self.with_objective(self.objective.drop(*names))

    def add_terms(self, *terms: Term | TermFn) -> Step:
        """The step with ``terms`` added to its objective."""
        return self.with_objective(self.objective.add(*terms))

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
        measuring = isinstance(self.loss, Compiled) and self.loss.deciding
        device = self._device()
        if measuring:
            start = _clock(device)
        outputs = self.outputs(batch, teacher_outputs=teacher_outputs, **model_args)
        self.check(outputs)
        ctx = make_context(progress, step, device=device)
        if measuring:
            middle = _clock(device)
        result: StepOutput = self.loss(outputs.student, outputs.teacher, ctx)
        if measuring:
            end = _clock(device)
            self.loss.observe(end - middle, end - start)  # type: ignore[attr-defined]
        return result


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


__all__ = ["Step"]
