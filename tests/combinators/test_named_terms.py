"""Issue 13, composing: terms carry names (look up, re-weight, replace, drop, add by name; a
duplicate is an error), the models stage owns the student, a term's trainable modules reach
``step.parameters()``, and a term's output is checked with a message naming the term."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from purekd import losses, projections
from purekd.combinators import (
    Objective,
    Step,
    compiled,
    models_stage,
    objective,
    single_teacher,
    weighted,
)
from purekd.schedules import linear_growth
from purekd.stages import Adapted
from purekd.terms import Term, as_term, hard_label, intermediate_match, logits_kd, make_context
from tests._toys import ToyEncoder, make_step, toy_adaptor, toy_batch

CONFIG = {"temperature": 2, "hard_label_weight": 0.5,
          "intermediate_matches": [{"layer_T": 3, "layer_S": 2, "feature": "hidden",
                                    "loss": "hidden_mse", "weight": 1, "proj": ["linear", 6, 8]}]}
NAMES = ("kd_loss", "hidden_hidden_mse_2_3", "hard_label_loss")


def setup():
    torch.manual_seed(0)
    teacher, student = ToyEncoder(8, 3).eval(), ToyEncoder(6)
    return teacher, student, make_step(CONFIG, teacher, student, toy_adaptor(), toy_adaptor())


def test_the_names_of_the_terms_are_the_names_in_out_terms():
    _, _, step = setup()
    assert step.objective.names == NAMES
    out = step(toy_batch(0))
    assert tuple(out.terms) == NAMES
    assert step.objective["kd_loss"].name == "kd_loss"
    assert "hard_label_loss" in step.objective and "nope" not in step.objective


def test_reweight_replace_drop_and_add_by_name_without_reaching_into_eager():
    _, _, step = setup()
    batch = toy_batch(0)
    base = step(batch, progress=0.5)
    terms = base.terms
    reweighted = step.reweight("kd_loss", 3.0)(batch, progress=0.5)
    torch.testing.assert_close(reweighted.loss, base.loss + 2.0 * terms["kd_loss"])
    dropped = step.drop_terms("hard_label_loss")(batch, progress=0.5)
    assert tuple(dropped.terms) == NAMES[:2]
    torch.testing.assert_close(dropped.loss, base.loss - 0.5 * terms["hard_label_loss"])
    mse = Term(lambda s, t, ctx: {"kd_loss": losses.kd_mse(s.logits[0], t.logits[0], 2.0)},
               name="kd_loss")
    replaced = step.replace_term("kd_loss", mse)(batch, progress=0.5)
    expected_mse = losses.kd_mse(*(o.logits[0] for o in step.outputs(batch)), 2.0)
    torch.testing.assert_close(replaced.terms["kd_loss"], expected_mse)

    def l1(s, t, ctx):
        return {"l1": (s.logits[0] - t.logits[0]).abs().mean()}

    added = step.add_terms(weighted(l1, linear_growth))(batch, progress=0.5)
    torch.testing.assert_close(added.loss, base.loss + 0.5 * added.terms["l1"])
    scaled = step.objective.scale("hidden_hidden_mse_2_3", 2.0)
    assert scaled["hidden_hidden_mse_2_3"].weight == 2.0
    # every edit is a new step sharing the models and the projection; the original is unchanged
    edited = step.reweight("kd_loss", 0.0)
    assert edited.student is step.student and edited.projections[0] is step.projections[0]
    assert edited.loss.enabled == step.loss.enabled and step.objective["kd_loss"].weight == 1
    assert edited.projection_groups == step.projection_groups


def test_unknown_and_duplicate_names_are_errors():
    _, _, step = setup()
    with pytest.raises(KeyError, match=r"no term named 'kd'.*'kd_loss'"):
        step.reweight("kd", 2.0)
    with pytest.raises(ValueError, match="both named 'kd_loss'"):
        step.add_terms(logits_kd())
    with pytest.raises(ValueError, match="both named 'kd_loss'"):
        objective(logits_kd(), logits_kd(weight=2.0))
    assert objective(logits_kd(), logits_kd(name="kd_again")).names == ("kd_loss", "kd_again")
    assert as_term(lambda s, t, c: {}, name="x").name == "x"


def test_an_objective_is_immutable_and_edits_return_new_ones():
    obj = objective(logits_kd(), hard_label())
    with pytest.raises(AttributeError, match="immutable"):
        obj.terms = ()  # type: ignore[misc]
    assert isinstance(obj.drop("kd_loss"), Objective) and obj.names == ("kd_loss", "hard_label_loss")
    with pytest.raises(TypeError, match="by its name"):
        obj[0]  # type: ignore[index]


def test_the_step_takes_the_student_from_the_models_stage():
    teacher, student, _ = setup()
    outputs = models_stage(single_teacher(teacher, toy_adaptor()), student, toy_adaptor())
    step = Step(outputs=outputs, loss=objective(logits_kd(), hard_label()))
    assert step.student is student
    assert {id(p) for p in step.parameters()} == {id(p) for p in student.parameters()}
    Step(student=student, outputs=outputs, loss=objective(hard_label()))  # the same: fine
    with pytest.raises(ValueError, match="not the student the models stage runs"):
        Step(student=ToyEncoder(6), outputs=outputs, loss=objective(hard_label()))
    with pytest.raises(TypeError, match="does not say which model is the student"):
        Step(outputs=lambda batch, **kw: None, loss=objective(hard_label()))


def test_a_terms_projection_reaches_step_parameters_without_being_listed():
    teacher, student, _ = setup()
    projection = projections.linear(6, 8)
    match = intermediate_match("hidden", 2, 3, losses.hidden_mse, projection)
    assert match.modules == (projection,)
    step = Step(outputs=models_stage(single_teacher(teacher, toy_adaptor()), student,
                                     toy_adaptor()),
                loss=compiled(objective(logits_kd(), match), enabled=False))
    assert list(step.projections) == [projection]
    params = {id(p) for p in step.parameters()}
    assert all(id(p) in params for p in projection.parameters())
    step(toy_batch(0)).loss.backward()
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    # listed explicitly as well: once
    twice = Step(outputs=step.outputs, loss=step.loss, projections=[projection])
    assert list(twice.projections) == [projection]


def test_a_term_holding_an_undeclared_trainable_module_warns():
    teacher, student, _ = setup()
    head = nn.Linear(6, 8)

    def projected_mse(s, t, ctx):
        return {"projected_mse": losses.hidden_mse(head(s.hidden[2]), t.hidden[3])}

    outputs = models_stage(single_teacher(teacher, toy_adaptor()), student, toy_adaptor())
    with pytest.warns(UserWarning, match=r"term 'projected_mse' uses a Linear.*modules=\(module,\)"):
        Step(outputs=outputs, loss=objective(projected_mse))
    step = Step(outputs=outputs, loss=objective(Term(projected_mse, modules=(head,))))
    assert list(step.projections) == [head]
    head.requires_grad_(False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Step(outputs=outputs, loss=objective(projected_mse))  # frozen on purpose: no warning


@pytest.mark.parametrize("enabled", [False, True])
def test_a_terms_output_is_checked_and_the_error_names_the_term(enabled, monkeypatch):
    if enabled:
        monkeypatch.setattr(torch, "compile", _eager_backend_compile)
    teacher, student, _ = setup()
    outputs = models_stage(single_teacher(teacher, toy_adaptor()), student, toy_adaptor())

    def as_tensor(s, t, ctx):
        return (s.logits[0] - t.logits[0]).pow(2).mean()

    def per_sample(s, t, ctx):
        return {"per_sample": (s.logits[0] - t.logits[0]).pow(2).mean(-1)}

    def misnamed(s, t, ctx):
        return {"other": s.logits[0].sum()}

    cases = [(as_tensor, TypeError, r"term 'as_tensor' returned a Tensor.*\{'as_tensor': value\}"),
             (per_sample, ValueError, r"term 'per_sample' returned a tensor of shape \(4,\).*\.mean\(\)"),
             (misnamed, ValueError, r"term 'misnamed' returned the name 'other'.*name='other'")]
    for fn, error, message in cases:
        step = Step(outputs=outputs, loss=compiled(objective(fn), enabled=enabled))
        before = [p.detach().clone() for p in student.parameters()]
        with pytest.raises(error, match=message):
            step(toy_batch(0))
        assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


def _eager_backend_compile(fn=None, **options):
    options.setdefault("backend", "eager")
    return _REAL_COMPILE(fn, **options)


_REAL_COMPILE = torch.compile


def test_the_output_check_adds_no_graph_break():
    _, _, step = setup()
    s, t = step.outputs(toy_batch(0))
    explained = torch._dynamo.explain(step.objective)(s, t, make_context(0.3))
    assert explained.graph_break_count == 0


def test_adapted_accepts_single_tensors_and_lists():
    logits = torch.randn(4, 3)
    adapted = Adapted(logits=logits, hidden=[torch.randn(4, 2, 5)])
    assert adapted.logits == (logits,) and isinstance(adapted.hidden, tuple)
    assert adapted._replace(labels=torch.zeros(4)).labels[0].shape == (4,)
    out = logits_kd(temperature=2.0)(adapted, Adapted(logits=logits.flip(0)), make_context())
    torch.testing.assert_close(out["kd_loss"], losses.kd_ce(logits, logits.flip(0), 2.0))
    with pytest.raises(TypeError, match=r"Adapted\(logits=...\): expected a tensor"):
        Adapted(logits=3)


def test_a_task_router_edits_every_tasks_step_by_name():
    torch.manual_seed(0)
    teachers = {"a": ToyEncoder(8, 3), "b": ToyEncoder(8, 3)}
    router = make_step(CONFIG, teachers, ToyEncoder(6), {"a": toy_adaptor(), "b": toy_adaptor()},
                       {"a": toy_adaptor(), "b": toy_adaptor()})
    dropped = router.drop_terms("hard_label_loss").reweight("kd_loss", 2.0)
    batch = toy_batch(0)
    for task in ("a", "b"):
        base, edited = router(batch, task), dropped(batch, task)
        assert tuple(edited.terms) == NAMES[:2]
        torch.testing.assert_close(
            edited.loss, 2.0 * base.terms["kd_loss"] + base.terms["hidden_hidden_mse_2_3"])
    assert {id(p) for p in dropped.parameters()} == {id(p) for p in router.parameters()}
