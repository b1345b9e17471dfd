"""``chain``: composing stages equals calling them one after the other by hand."""

from __future__ import annotations

import pytest
import torch

from purekd.combinators import chain, models_stage, single_teacher
from purekd.stages import adapt, batch_split, forward
from tests._toys import ToyEncoder, assert_tree_close, toy_adaptor, toy_batch


def test_chain_applies_stages_left_to_right():
    def add_one(x):
        return x + 1

    def double(x):
        return 2 * x

    def square(x):
        return x * x

    assert chain(add_one, double, square)(3) == square(double(add_one(3))) == 64
    assert chain(double)(5) == 10


def test_chain_of_pipeline_stages_equals_calling_them_by_hand():
    torch.manual_seed(0)
    student = ToyEncoder()
    adaptor = toy_adaptor()
    batch = toy_batch()

    def run_student(split):
        return split.student, forward(student, split.student)

    def adapt_student(pair):
        return adapt(adaptor, *pair)

    pipeline = chain(batch_split, run_student, adapt_student)
    by_hand = adapt(adaptor, batch, forward(student, batch_split(batch).student))
    assert_tree_close(pipeline(batch), by_hand)


def test_chain_with_a_models_stage():
    torch.manual_seed(0)
    teacher, student = ToyEncoder(8, 3), ToyEncoder()
    adaptor = toy_adaptor()
    batch = toy_batch()
    outputs = models_stage(single_teacher(teacher, adaptor), student, adaptor)
    pipeline = chain(outputs, lambda out: out.student.logits[0] - out.teacher.logits[0])
    expected = student(*batch)["logits"][0] - teacher(*batch)["logits"][0]
    torch.testing.assert_close(pipeline(batch), expected)


def test_chain_under_compilation_equals_by_hand():
    pipeline = chain(torch.sin, lambda x: x * 3, torch.tanh)
    x = torch.randn(5)
    compiled = torch.compile(pipeline, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), torch.tanh(torch.sin(x) * 3))


def test_chain_rejects_no_stages_and_non_callables():
    with pytest.raises(ValueError, match="at least one stage"):
        chain()
    with pytest.raises(TypeError, match=r"stage #1 is not callable \(int\)"):
        chain(abs, 3)
