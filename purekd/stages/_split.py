"""``batch_split``: which part of a batch the teacher sees and which the student sees."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import Tensor

from purekd.losses import AlignedSpans

TEACHER, STUDENT, TEACHER_CACHE = "teacher", "student", "teacher_cache"
SPANS = "spans"


class Split(NamedTuple):
    """A batch split into the teacher's input, the student's input and cached teacher outputs.

    ``teacher_cache`` is ``None`` unless the batch carried pre-computed teacher outputs, in
    which case they replace the teacher's forward pass (and go to the teacher's adaptor).
    ``spans`` is ``None`` unless the two models have different tokenizers and the batch carried
    their :class:`~purekd.losses.AlignedSpans` (``'spans'``, from
    :class:`~purekd.stages.CrossTokenizerCollator`); it goes to the loss, not to a model.
    """

    teacher: Any
    student: Any
    teacher_cache: Any = None
    spans: AlignedSpans | None = None


def _spans(value: Any) -> AlignedSpans | None:
    """The batch's ``'spans'`` as :class:`AlignedSpans` (a plain 7-tuple of tensors, as a
    loader may make of it, is rebuilt); anything else is a ``TypeError`` naming the key."""
    if value is None or isinstance(value, AlignedSpans):
        return value
    if (isinstance(value, (tuple, list)) and len(value) == len(AlignedSpans._fields)
            and all(isinstance(v, Tensor) for v in value)):
        return AlignedSpans(*value)
    raise TypeError(
        f"the batch's 'spans' is a {type(value).__name__}: it must be the AlignedSpans of the "
        "teacher's and the student's tokenisations (CrossTokenizerCollator, align_batches)")


def batch_split(batch: Any) -> Split:
    """Split a batch by TextBrewer's convention.

    A mapping with keys ``'teacher'`` and ``'student'`` (and optionally ``'teacher_cache'``, and
    ``'spans'`` when the two models have different tokenizers) is split; anything else is the
    same input for both models (a ``'spans'`` key there is the models' own input).

    >>> batch_split({'teacher': (1,), 'student': (2,)})
    Split(teacher=(1,), student=(2,), teacher_cache=None, spans=None)
    >>> batch_split((3,))
    Split(teacher=(3,), student=(3,), teacher_cache=None, spans=None)
    """
    if isinstance(batch, Mapping):
        has_teacher, has_student = TEACHER in batch, STUDENT in batch
        if has_teacher and has_student:
            return Split(batch[TEACHER], batch[STUDENT], batch.get(TEACHER_CACHE),
                         _spans(batch.get(SPANS)))
        if has_teacher or has_student or TEACHER_CACHE in batch:
            present = [k for k in (TEACHER, STUDENT, TEACHER_CACHE) if k in batch]
            raise ValueError(
                f"the batch has the key(s) {present} but not both 'teacher' and 'student': to feed "
                "different batches, give a dict with both keys (and optionally 'teacher_cache')"
            )
    return Split(batch, batch)


__all__ = ["Split", "batch_split"]
