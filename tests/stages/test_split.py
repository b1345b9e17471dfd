"""batch_split: TextBrewer's convention for different teacher and student batches."""

from __future__ import annotations

import pytest
import torch

from purekd.stages import Split, batch_split


def test_teacher_and_student_keys_are_split():
    teacher, student = {"input_ids": torch.ones(2, 3)}, (torch.zeros(2, 3),)
    split = batch_split({"teacher": teacher, "student": student})
    assert isinstance(split, Split)
    assert split.teacher is teacher
    assert split.student is student
    assert split.teacher_cache is None


def test_teacher_cache_is_carried():
    cache = {"logits": torch.randn(2, 4)}
    split = batch_split({"teacher": (1,), "student": (2,), "teacher_cache": cache})
    assert split == Split((1,), (2,), cache)
    assert split.teacher_cache is cache


@pytest.mark.parametrize(
    "batch",
    [
        {"input_ids": torch.ones(2, 3), "labels": torch.zeros(2)},
        (torch.ones(2, 3), torch.zeros(2)),
        [torch.ones(2, 3)],
        {},
        torch.ones(2, 3),
    ],
    ids=["dict", "tuple", "list", "empty-dict", "tensor"],
)
def test_anything_else_goes_to_both(batch):
    split = batch_split(batch)
    assert split.teacher is batch
    assert split.student is batch
    assert split.teacher_cache is None


@pytest.mark.parametrize(
    ("batch", "present"),
    [
        ({"teacher": (1,)}, "teacher"),
        ({"student": (1,)}, "student"),
        ({"teacher_cache": {}, "input_ids": (1,)}, "teacher_cache"),
        ({"teacher": (1,), "teacher_cache": {}}, "teacher_cache"),
    ],
)
def test_partial_split_raises(batch, present):
    with pytest.raises(ValueError, match=present) as info:
        batch_split(batch)
    assert "'teacher' and 'student'" in str(info.value)


def test_input_not_modified():
    batch = {"teacher": (1,), "student": (2,), "teacher_cache": None}
    before = dict(batch)
    batch_split(batch)
    assert batch == before
