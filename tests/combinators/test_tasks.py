"""``route_by_task``: one step per task, sharing the student; equal to calling that step."""

from __future__ import annotations

import pytest
import torch

import purekd
from purekd.combinators import TaskRouter, route_by_task
from tests._toys import ToyEncoder, make_step, toy_adaptor, toy_batch

MATCH = {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
         "proj": ["linear", 6, 8]}


def models():
    torch.manual_seed(0)
    return {"a": ToyEncoder(8, 3), "b": ToyEncoder(8, 3)}, ToyEncoder(6, n_logits=2)


def test_route_by_task_calls_the_step_of_the_task():
    teachers, student = models()
    steps = {task: make_step({"intermediate_matches": [MATCH]}, teachers[task], student,
                             toy_adaptor(), toy_adaptor(logits=[i]))
             for i, task in enumerate(("a", "b"))}
    router = route_by_task(steps)
    assert isinstance(router, TaskRouter) and router.tasks == ["a", "b"]
    batch = toy_batch()
    for task, step in steps.items():
        got, expected = router(batch, task, progress=0.4), step(batch, progress=0.4)
        torch.testing.assert_close(got.loss, expected.loss)
        assert got.terms.keys() == expected.terms.keys()
    with pytest.raises(ValueError, match=r"unknown task 'c'; known tasks: \['a', 'b'\]"):
        router(batch, "c")
    with pytest.raises(ValueError, match="at least one task"):
        route_by_task({})


def test_make_step_with_teachers_by_task_shares_student_and_projections():
    teachers, student = models()
    adaptors_T = {"a": toy_adaptor(), "b": toy_adaptor()}
    adaptors_S = {"a": toy_adaptor(logits=[0]), "b": toy_adaptor(logits=[1])}
    router = make_step({"intermediate_matches": [MATCH]}, teachers, student, adaptors_T, adaptors_S)
    assert router.steps["a"].projections is router.steps["b"].projections is router.projections
    params = list(router.parameters())
    assert len(params) == len({id(p) for p in params})
    assert {id(p) for p in params} == {id(p) for p in student.parameters()} | {
        id(p) for p in router.projections.parameters()}
    # by hand: task b's step is a single-teacher step with the same projection
    batch = toy_batch()
    single = purekd.make_step({"intermediate_matches": [MATCH]}, teachers["b"], student,
                              toy_adaptor(), toy_adaptor(logits=[1]), compile=False,
                              projections=list(router.projections))
    torch.testing.assert_close(router(batch, "b").loss, single(batch).loss)


def test_make_step_needs_adaptors_by_task_for_teachers_by_task():
    teachers, student = models()
    with pytest.raises(ValueError, match="needs adaptor_T as a dict with the same tasks"):
        make_step({}, teachers, student, toy_adaptor(), {"a": toy_adaptor(), "b": toy_adaptor()})
    with pytest.raises(ValueError, match="needs adaptor_S as a dict"):
        make_step({}, teachers, student, {"a": toy_adaptor(), "b": toy_adaptor()},
                  {"a": toy_adaptor()})
    with pytest.raises(TypeError, match="adaptor_S is a dict but model_T is not"):
        make_step({}, teachers["a"], student, toy_adaptor(), {"a": toy_adaptor()})
