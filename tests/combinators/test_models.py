"""Model stages: the teacher stage(s) and ``models_stage`` equal running the models by hand."""

from __future__ import annotations

import pytest
import torch

from purekd.combinators import (
    Outputs,
    capture_outputs,
    mean_of_teachers,
    models_stage,
    single_teacher,
)
from purekd.stages import Split, adapt, batch_split, normalise
from tests._toys import BrokenTeacher, ToyEncoder, assert_tree_close, toy_adaptor, toy_batch


def teachers_and_student(n=3):
    torch.manual_seed(0)
    return [ToyEncoder(8, layers=3) for _ in range(n)], ToyEncoder(6)


def test_single_teacher_runs_without_autograd_and_adapts():
    (teacher,), _ = teachers_and_student(1)
    adaptor = toy_adaptor()
    batch = toy_batch()
    got = single_teacher(teacher, adaptor)(batch_split(batch), {})
    assert_tree_close(got, adapt(adaptor, batch, teacher(*batch)))
    assert not any(t.requires_grad for t in (*got.logits, *got.hidden, *got.attention))


def test_single_teacher_uses_cached_outputs_instead_of_the_model():
    (teacher,), _ = teachers_and_student(1)
    adaptor = toy_adaptor()
    batch = toy_batch()
    cached = teacher(*batch)  # with grad: the stage must detach it
    got = single_teacher(BrokenTeacher(), adaptor)(Split(batch, batch, cached), {})
    assert_tree_close(got, adapt(adaptor, batch, cached))
    assert not got.logits[0].requires_grad


def test_single_teacher_passes_model_args():
    (teacher,), _ = teachers_and_student(1)
    adaptor = toy_adaptor()
    batch = toy_batch()
    got = single_teacher(teacher, adaptor)(batch_split(batch), {"scale": 3.0})
    assert_tree_close(got, adapt(adaptor, batch, teacher(*batch, scale=3.0)))


@pytest.mark.parametrize("per_teacher_adaptors", [False, True])
def test_mean_of_teachers_averages_logits(per_teacher_adaptors):
    teachers, _ = teachers_and_student()
    adaptor = toy_adaptor()
    adaptors = [toy_adaptor() for _ in teachers] if per_teacher_adaptors else adaptor
    batch = toy_batch()
    got = mean_of_teachers(teachers, adaptors)(batch_split(batch), {})
    outputs = [t(*batch) for t in teachers]
    mean = sum(o["logits"][0] for o in outputs) / len(teachers)
    torch.testing.assert_close(got.logits[0], mean)
    first = adapt(adaptor, batch, outputs[0])  # the other keys: the first teacher's
    assert_tree_close(got.hidden, first.hidden)
    assert_tree_close(got.attention, first.attention)
    assert not got.logits[0].requires_grad


def test_mean_of_teachers_reads_one_cached_output_per_teacher():
    teachers, _ = teachers_and_student(2)
    adaptor = toy_adaptor()
    batch = toy_batch()
    cached = [t(*batch) for t in teachers]
    got = mean_of_teachers([BrokenTeacher(), BrokenTeacher()], adaptor)(
        Split(batch, batch, cached), {})
    live = mean_of_teachers(teachers, adaptor)(batch_split(batch), {})
    assert_tree_close(got, live)


def test_mean_of_teachers_rejects_bad_arguments():
    teachers, _ = teachers_and_student(2)
    with pytest.raises(ValueError, match="at least one teacher"):
        mean_of_teachers([], toy_adaptor())
    with pytest.raises(ValueError, match="2 teachers but 3 adaptors"):
        mean_of_teachers(teachers, [toy_adaptor()] * 3)


def test_models_stage_equals_running_both_models_by_hand():
    (teacher,), student = teachers_and_student(1)
    adaptor = toy_adaptor()
    batch = toy_batch()
    out = models_stage(single_teacher(teacher, adaptor), student, adaptor)(batch, scale=0.5)
    assert isinstance(out, Outputs)
    assert_tree_close(out.student, adapt(adaptor, batch, student(*batch, scale=0.5)))
    assert_tree_close(out.teacher, adapt(adaptor, batch, teacher(*batch, scale=0.5)))
    assert out.student.logits[0].requires_grad


def test_models_stage_with_a_custom_split():
    """Swap one stage: the teacher sees a noisy copy of the student's input."""
    (teacher,), student = teachers_and_student(1)
    adaptor = toy_adaptor()
    batch = toy_batch()

    def noisy_teacher_split(batch):
        x, mask, labels = batch
        return Split(teacher=(x + 0.1, mask, labels), student=batch)

    stage = models_stage(single_teacher(teacher, adaptor), student, adaptor,
                         split=noisy_teacher_split)
    out = stage(batch)
    noisy = (batch[0] + 0.1, *batch[1:])
    assert_tree_close(out.teacher, adapt(adaptor, noisy, teacher(*noisy)))
    assert_tree_close(out.student, adapt(adaptor, batch, student(*batch)))


def test_models_stage_with_a_custom_teacher_stage():
    """Swap the teacher stage for any ``(split, args) -> Adapted`` function."""
    _, student = teachers_and_student(1)
    adaptor = toy_adaptor()
    batch = toy_batch()
    fixed = normalise({"logits": torch.zeros(4, 5)})
    out = models_stage(lambda split, args: fixed, student, adaptor)(batch)
    assert out.teacher is fixed


def test_models_stage_teacher_outputs_take_the_students_logits_mask():
    _, student = teachers_and_student(1)
    adaptor = toy_adaptor(logits_mask=True)
    batch = toy_batch()
    cached = normalise({"logits": torch.zeros(4, 5)})
    out = models_stage(single_teacher(BrokenTeacher(), adaptor), student, adaptor)(
        batch, teacher_outputs=cached)
    assert_tree_close(out.teacher.logits_mask, out.student.logits_mask)
    assert_tree_close(out.teacher.logits, cached.logits)


def test_capture_outputs_records_and_removes_its_hooks():
    (teacher,), student = teachers_and_student(1)
    batch = toy_batch()
    with capture_outputs([student.blocks[1], teacher.embed, teacher.outs[0]]) as captured:
        student(*batch)
    assert captured[0] is not None and captured[1] is None and captured[2] is None
    torch.testing.assert_close(
        captured[0], student.blocks[1](torch.tanh(student.blocks[0](student.embed(batch[0])))))
    assert not student.blocks[1]._forward_hooks and not teacher.embed._forward_hooks
