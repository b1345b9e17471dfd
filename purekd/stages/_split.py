"""``batch_split``: which part of a batch the teacher sees and which the student sees."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

TEACHER, STUDENT, TEACHER_CACHE = "teacher", "student", "teacher_cache"


class Split(NamedTuple):
    """A batch split into the teacher's input, the student's input and cached teacher outputs.

    ``teacher_cache`` is ``None`` unless the batch carried pre-computed teacher outputs, in
    which case they replace the teacher's forward pass (and go to the teacher's adaptor).
    """

    teacher: Any
    student: Any
    teacher_cache: Any = None


def batch_split(batch: Any) -> Split:
    """Split a batch by TextBrewer's convention.

    A mapping with keys ``'teacher'`` and ``'student'`` (and optionally ``'teacher_cache'``) is
    split; anything else is the same input for both models.

    >>> batch_split({'teacher': (1,), 'student': (2,)})
    Split(teacher=(1,), student=(2,), teacher_cache=None)
    >>> batch_split((3,))
    Split(teacher=(3,), student=(3,), teacher_cache=None)
    """
    if isinstance(batch, Mapping):
        has_teacher, has_student = TEACHER in batch, STUDENT in batch
        if has_teacher and has_student:
            return Split(batch[TEACHER], batch[STUDENT], batch.get(TEACHER_CACHE))
        if has_teacher or has_student or TEACHER_CACHE in batch:
            present = [k for k in (TEACHER, STUDENT, TEACHER_CACHE) if k in batch]
            raise ValueError(
                f"the batch has the key(s) {present} but not both 'teacher' and 'student': to feed "
                "different batches, give a dict with both keys (and optionally 'teacher_cache')"
            )
    return Split(batch, batch)


__all__ = ["Split", "batch_split"]
