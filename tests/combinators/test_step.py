"""``Step``: what it registers, and that it never mutates a config, a model's mode or its
inputs; a step assembled by hand from the combinators equals ``make_step``'s."""

from __future__ import annotations

import copy
import itertools

import attrs
import pytest
import torch
from torch import nn

import purekd
from purekd import losses, projections
from purekd.combinators import (
    Step,
    compiled,
    models_stage,
    objective,
    scheduled_after_start,
    single_teacher,
    weighted,
)
from purekd.schedules import linear_decay
from purekd.terms import hard_label, intermediate_match, logits_kd
from tests._toys import ToyEncoder, assert_tree_close, make_step, toy_adaptor, toy_batch
from tests.conftest import call_and_check_untouched, clone_tree

MATCHES = [
    {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
     "proj": ["linear", 6, 8]},
    {"layer_T": [0, 2], "layer_S": [0, 1], "feature": "hidden", "loss": "fsp", "weight": 0.5,
     "proj": ["tanh", 6, 8]},
    {"layer_T": 1, "layer_S": 1, "feature": "attention", "loss": "attention_ce", "weight": 0.2},
]
CONFIG = {"temperature": 3, "temperature_scheduler": ["flsw", 1, 2], "probability_shift": True,
          "hard_label_weight": 0.5, "kd_loss_weight_scheduler": "linear_decay",
          "intermediate_matches": MATCHES}


def models():
    torch.manual_seed(0)
    return ToyEncoder(8, 3), ToyEncoder(6)


def test_step_parameters_are_the_students_and_the_projections():
    teacher, student = models()
    step = make_step(CONFIG, teacher, student, toy_adaptor(), toy_adaptor())
    assert len(step.projections) == 2
    ids = {id(p) for p in step.parameters()}
    assert ids == ({id(p) for p in student.parameters()}
                   | {id(p) for p in step.projections.parameters()})
    assert not ids & {id(p) for p in teacher.parameters()}
    assert step.teachers == {"teacher": teacher}
    assert step.projection_options == [{}, {}, None]


def test_teacher_gets_no_gradient():
    teacher, student = models()
    step = make_step(CONFIG, teacher, student, toy_adaptor(), toy_adaptor())
    step(toy_batch()).loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in step.projections.parameters())


def test_step_does_not_mutate_the_config():
    teacher, student = models()
    as_dict = copy.deepcopy(CONFIG)
    step = make_step(as_dict, teacher, student, toy_adaptor(), toy_adaptor())
    config = purekd.DistillationConfig.from_dict(CONFIG)
    step_from_config = purekd.make_step(config, teacher, student, toy_adaptor(), toy_adaptor(),
                                        compile=False)
    before = config.to_dict()
    for progress in (0.0, 0.5, 1.0):
        step(toy_batch(), progress=progress).loss.backward()
        step_from_config(toy_batch(), progress=progress).loss.backward()
    assert as_dict == CONFIG  # TextBrewer appended {} to each 'proj' list; purekd does not
    assert config.to_dict() == before
    assert config.kd_loss_weight == 1  # TextBrewer overwrote the weight as it trained
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.kd_loss_weight = 0.5
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.intermediate_matches[0].weight = 2


@pytest.mark.parametrize(("teacher_training", "student_training"),
                         list(itertools.product([True, False], repeat=2)))
def test_step_keeps_the_models_train_or_eval_mode(teacher_training, student_training):
    teacher, student = models()
    teacher.train(teacher_training)
    student.train(student_training)
    step = make_step(CONFIG, teacher, student, toy_adaptor(), toy_adaptor())
    step(toy_batch()).loss.backward()
    assert all(m.training == teacher_training for m in teacher.modules())
    assert all(m.training == student_training for m in student.modules())


def test_step_does_not_modify_its_inputs():
    teacher, student = models()
    adaptor = toy_adaptor()
    step = make_step(CONFIG, teacher, student, adaptor, adaptor)
    batch = toy_batch()
    with torch.no_grad():
        cached = teacher(*batch)
    # probability_shift must not swap the cached teacher logits in place (TextBrewer does)
    split = {"teacher": batch, "student": batch, "teacher_cache": cached}
    out = call_and_check_untouched(step, split)
    out.loss.backward()
    teacher_outputs = step.outputs(batch).teacher
    before = clone_tree(tuple(teacher_outputs))
    step(batch, teacher_outputs=teacher_outputs)
    assert_tree_close(tuple(teacher_outputs), before, atol=0)


def test_step_built_by_hand_equals_make_step():
    teacher, student = models()
    adaptor = toy_adaptor()
    config = {"temperature": 3, "hard_label_weight": 0.5, "kd_loss_weight": 2,
              "kd_loss_weight_scheduler": "linear_decay", "intermediate_matches": MATCHES[:1]}
    reference = make_step(config, teacher, student, adaptor, adaptor)

    torch.manual_seed(1)  # the projection drawn as make_step draws it
    proj = projections.linear(6, 8)
    loss = objective(
        weighted(logits_kd(losses.kd_ce, temperature=3), scheduled_after_start(2, linear_decay)),
        intermediate_match("hidden", 2, 3, losses.hidden_mse, proj, loss_name="hidden_mse"),
        hard_label(weight=0.5),
    )
    step = Step(student=student, loss=compiled(loss, enabled=False),
                outputs=models_stage(single_teacher(teacher, adaptor), student, adaptor),
                projections=nn.ModuleList([proj]))
    batch = toy_batch()
    for progress in (0.0, 0.3):
        got, expected = step(batch, progress=progress), reference(batch, progress=progress)
        assert_tree_close(got.terms, expected.terms)
        torch.testing.assert_close(got.loss, expected.loss)
