"""Model stages: run the teacher(s) and the student on a split batch and adapt their outputs.

A teacher stage is ``(split, args) -> Adapted`` and runs without autograd; it reads
``split.teacher_cache`` instead of calling the model when the batch carries cached outputs.
:func:`models_stage` puts a teacher stage and the student together:
``(batch, **args) -> Outputs(student, teacher)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from purekd.stages import (
    Adapted,
    Split,
    adapt,
    batch_split,
    detach,
    forward,
    mean_logits,
    output_weight,
    share_equal_masks,
    sparse_tied_embedding,
)

Adaptor = Callable[[Any, Any], Any]
TeacherStage = Callable[[Split, Mapping[str, Any]], Adapted]


class Outputs(NamedTuple):
    """Both models' adapted outputs for one batch."""

    student: Adapted
    teacher: Adapted


@contextmanager
def capture_outputs(modules: Sequence[nn.Module]) -> Iterator[list[Any]]:
    """Record each module's forward output while the block runs (the last call wins).

    Yields a list with one slot per module (``None`` if it was not called); the hooks are
    removed on exit, so nothing stays attached to the model.
    """
    captured: list[Any] = [None] * len(modules)
    handles = []
    for index, module in enumerate(modules):
        def hook(_module: nn.Module, _inputs: Any, output: Any, index: int = index) -> None:
            captured[index] = output
        handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def single_teacher(model_T: Callable[..., Any], adaptor_T: Adaptor,
                   capture: Sequence[nn.Module] = ()) -> TeacherStage:
    """The teacher's forward (under ``torch.no_grad``) and adaptor, or its cached outputs."""

    def teacher(split: Split, args: Mapping[str, Any]) -> Adapted:
        with capture_outputs(capture) as captured, torch.no_grad():
            outputs = (split.teacher_cache if split.teacher_cache is not None
                       else forward(model_T, split.teacher, **args))
        adapted = adapt(adaptor_T, split.teacher, outputs)
        return detach(adapted._replace(captured=tuple(captured)))

    return teacher


def mean_of_teachers(models_T: Sequence[Callable[..., Any]],
                     adaptors_T: Adaptor | Sequence[Adaptor]) -> TeacherStage:
    """Several teachers whose logits are averaged (MultiTeacherDistiller).

    ``adaptors_T`` is one adaptor for all teachers or one per teacher. Cached outputs, when the
    batch has them, are a list with one entry per teacher.
    """
    models = list(models_T)
    if not models:
        raise ValueError("mean_of_teachers needs at least one teacher")
    adaptors = (list(adaptors_T) if isinstance(adaptors_T, Sequence)
                else [adaptors_T] * len(models))
    if len(adaptors) != len(models):
        raise ValueError(f"{len(models)} teachers but {len(adaptors)} adaptors: give one adaptor "
                         "per teacher, or a single adaptor for all")

    def teachers(split: Split, args: Mapping[str, Any]) -> Adapted:
        adapted = []
        for index, (model, adaptor) in enumerate(zip(models, adaptors, strict=True)):
            cached = split.teacher_cache[index] if split.teacher_cache is not None else None
            adapted.append(single_teacher(model, adaptor)(split._replace(teacher_cache=cached), args))
        return mean_logits(adapted)

    return teachers


class ModelsStage:
    """``stage(batch, *, teacher_outputs=None, **args) -> Outputs``: split, run, adapt.

    Built by :func:`models_stage`. It owns the student (``stage.student``), so a
    :class:`~purekd.Step` built on it takes the student from here: ``Step(outputs=stage, loss=...)``.
    """

    def __init__(self, teacher: TeacherStage, model_S: Callable[..., Any], adaptor_S: Adaptor,
                 split: Callable[[Any], Split] = batch_split,
                 capture_S: Sequence[nn.Module] = ()):
        if not callable(teacher):
            raise TypeError(f"models_stage(teacher=...): a teacher stage must be callable "
                            f"(single_teacher(model, adaptor)), got {type(teacher).__name__}")
        if not callable(model_S):
            raise TypeError(f"models_stage(model_S=...): the student must be callable (an "
                            f"nn.Module), got {type(model_S).__name__}")
        if not callable(adaptor_S):
            raise TypeError(f"models_stage(adaptor_S=...): an adaptor must be callable "
                            f"(batch, outputs) -> dict, got {type(adaptor_S).__name__}")
        self.teacher = teacher
        self.student = model_S
        self.adaptor_S = adaptor_S
        self.split = split
        self.capture_S = list(capture_S)

    def __call__(self, batch: Any, *, teacher_outputs: Adapted | None = None,
                 **args: Any) -> Outputs:
        parts = self.split(batch)
        adapted_T = self.teacher(parts, args) if teacher_outputs is None else teacher_outputs
        weight = output_weight(self.adaptor_S)
        with capture_outputs(self.capture_S) as captured, \
                sparse_tied_embedding(self.student, weight) as alias:
            outputs_S = forward(self.student, parts.student, **args)
        adapted_S = adapt(self.adaptor_S, parts.student, outputs_S)._replace(
            captured=tuple(captured), spans=getattr(parts, "spans", None))
        if alias is not None and adapted_S.lm_weight is weight:
            # the tied output layer read through the alias made before the forward: no second
            # (V, H) gradient buffer (purekd.stages.sparse_tied_embedding)
            adapted_S = adapted_S._replace(lm_weight=alias)
        if teacher_outputs is not None and adapted_S.logits_mask and not adapted_T.logits_mask:
            adapted_T = adapted_T._replace(logits_mask=adapted_S.logits_mask)
        return Outputs(adapted_S, share_equal_masks(adapted_S, adapted_T))


def models_stage(
    teacher: TeacherStage,
    model_S: Callable[..., Any],
    adaptor_S: Adaptor,
    *,
    split: Callable[[Any], Split] = batch_split,
    capture_S: Sequence[nn.Module] = (),
) -> ModelsStage:
    """``(batch, *, teacher_outputs=None, **args) -> Outputs``: split, run, adapt.

    ``teacher_outputs`` (an :class:`Adapted`) replaces the teacher stage, e.g. with logits cached
    from an earlier epoch; like TextBrewer, it then takes the student's ``logits_mask``. The
    result owns the student (``.student``): give it to ``Step(outputs=...)`` without repeating
    the student.
    """
    return ModelsStage(teacher, model_S, adaptor_S, split, capture_S)


__all__ = ["Adaptor", "ModelsStage", "Outputs", "TeacherStage", "capture_outputs", "mean_of_teachers",
           "models_stage", "single_teacher"]
