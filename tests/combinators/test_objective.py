"""``objective``, ``weighted``, ``scheduled_after_start``: equal to summing and weighting the
terms by hand, eagerly and under compilation (progress as a 0-dim tensor)."""

from __future__ import annotations

import pytest
import torch

from purekd import losses
from purekd.combinators import (
    Objective,
    StepOutput,
    evaluate_weight,
    objective,
    scheduled_after_start,
    weighted,
)
from purekd.schedules import linear_decay, linear_growth
from purekd.stages import normalise
from purekd.terms import Term, hard_label, intermediate_match, logits_kd, make_context

PROGRESS = [0.0, 0.1, 0.5, 0.9, 1.0]


def adapted_pair(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    student = normalise({
        "logits": torch.randn(4, 5, generator=gen).requires_grad_(),
        "hidden": [torch.randn(4, 6, 3, generator=gen).requires_grad_() for _ in range(2)],
        "losses": torch.rand(2, generator=gen).requires_grad_(),
        "inputs_mask": mask,
    })
    teacher = normalise({
        "logits": torch.randn(4, 5, generator=gen),
        "hidden": [torch.randn(4, 6, 3, generator=gen) for _ in range(3)],
    })
    return student, teacher


def by_hand(student, teacher):
    """The three unweighted terms, computed directly from the losses."""
    return {
        "kd_loss": losses.kd_ce(student.logits[0], teacher.logits[0], 2.0),
        "hidden_mse": losses.hidden_mse(student.hidden[1], teacher.hidden[2],
                                        mask=student.inputs_mask),
        "hard_label_loss": student.losses[0].mean(),
    }


def three_terms(kd_weight=1.0, match_weight=1.0, hl_weight=1.0):
    return (logits_kd(losses.kd_ce, 2.0, weight=kd_weight),
            intermediate_match("hidden", 1, 2, losses.hidden_mse, weight=match_weight,
                               name="hidden_mse"),
            hard_label(weight=hl_weight))


def test_objective_sums_the_weighted_terms():
    student, teacher = adapted_pair()
    out = objective(*three_terms(0.5, 2.0, 0.25))(student, teacher, make_context(0.3))
    assert isinstance(out, StepOutput)
    expected = by_hand(student, teacher)
    assert set(out.terms) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(out.terms[name], value)
    total = 0.5 * expected["kd_loss"] + 2.0 * expected["hidden_mse"] + 0.25 * expected["hard_label_loss"]
    torch.testing.assert_close(out.loss, total)
    grads = torch.autograd.grad(out.loss, student.logits[0])[0]
    torch.testing.assert_close(grads, torch.autograd.grad(total, student.logits[0])[0])


def test_objective_accepts_plain_term_functions_and_skips_empty_terms():
    student, teacher = adapted_pair()

    def l1(s, t, ctx):
        return {"l1": (s.logits[0] - t.logits[0]).abs().mean()}

    def nothing(s, t, ctx):
        return {}

    out = objective(l1, nothing)(student, teacher, make_context())
    torch.testing.assert_close(out.loss, (student.logits[0] - teacher.logits[0]).abs().mean())
    assert list(out.terms) == ["l1"]


def test_objective_rejects_duplicate_names():
    student, teacher = adapted_pair()
    with pytest.raises(ValueError, match=r"both named 'hard_label_loss'.*distinct name"):
        objective(hard_label(), hard_label(weight=2.0))  # at construction, as optax named_chain
    renamed = objective(hard_label(), hard_label(weight=2.0, name="again"))
    out = renamed(student, teacher, make_context())
    torch.testing.assert_close(out.loss, 3 * student.losses[0].mean())


def test_objective_with_no_applicable_term_says_what_to_return():
    student, teacher = adapted_pair()
    with pytest.raises(ValueError, match="no loss term applies"):
        objective(hard_label())(student._replace(losses=()), teacher, make_context())


def test_objective_check_runs_every_terms_check():
    student, teacher = adapted_pair()
    calls = []
    checked = Term(lambda s, t, ctx: {}, 1.0, lambda s, t: calls.append((s, t)))
    obj = objective(hard_label(), checked, checked._replace(name="again"))
    assert isinstance(obj, Objective)
    obj.check(student, teacher)
    assert len(calls) == 2


@pytest.mark.parametrize("weight", [0.5, 3])
def test_weighted_by_a_constant(weight):
    student, teacher = adapted_pair()
    value = by_hand(student, teacher)["hard_label_loss"]
    out = objective(weighted(hard_label(), weight))(student, teacher, make_context())
    torch.testing.assert_close(out.loss, weight * value)
    torch.testing.assert_close(out.terms["hard_label_loss"], value)  # terms stay unweighted
    # weights multiply: the term's own weight, then each weighted()
    nested = weighted(weighted(hard_label(weight=2.0), weight), 0.25)
    assert nested.weight == 2.0 * weight * 0.25
    out = objective(nested)(student, teacher, make_context())
    torch.testing.assert_close(out.loss, 2.0 * weight * 0.25 * value)


@pytest.mark.parametrize("schedule", [linear_decay, linear_growth])
def test_weighted_by_a_schedule(schedule):
    student, teacher = adapted_pair()
    expected = by_hand(student, teacher)
    obj = objective(weighted(logits_kd(losses.kd_ce, 2.0, weight=3.0), schedule),
                    weighted(hard_label(), 0.5))
    for progress in PROGRESS:
        out = obj(student, teacher, make_context(progress))
        total = 3.0 * schedule(progress) * expected["kd_loss"] + 0.5 * expected["hard_label_loss"]
        torch.testing.assert_close(out.loss, total)


def test_weighted_schedules_under_compilation_equal_by_hand():
    student, teacher = adapted_pair()
    expected = by_hand(student, teacher)
    kd, match, hl = three_terms()
    obj = objective(weighted(kd, linear_decay),
                    weighted(match, scheduled_after_start(0.7, linear_growth)),
                    weighted(hl, 0.25))
    frames = []

    def counting_backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(obj, backend=counting_backend, fullgraph=True)
    for progress in PROGRESS:
        out = compiled(student, teacher, make_context(progress))
        w_match = 0.7 if progress == 0 else progress
        total = ((1 - progress) * expected["kd_loss"] + w_match * expected["hidden_mse"]
                 + 0.25 * expected["hard_label_loss"])
        torch.testing.assert_close(out.loss, total)
    assert len(frames) == 1  # one graph for every progress


def test_scheduled_after_start_is_the_base_weight_at_the_start_only():
    weight = scheduled_after_start(0.8, linear_decay)
    assert weight(0.0) == 0.8
    assert weight(0) == 0.8
    for progress in PROGRESS[1:]:
        assert weight(progress) == pytest.approx(1 - progress)
        assert weight(torch.tensor(progress)).item() == pytest.approx(1 - progress)
    assert weight(torch.tensor(0.0)).item() == pytest.approx(0.8)
    compiled = torch.compile(weight, backend="aot_eager", fullgraph=True)
    for progress in PROGRESS:
        torch.testing.assert_close(compiled(torch.tensor(progress)),
                                   torch.tensor(0.8 if progress == 0 else 1 - progress))


def test_evaluate_weight():
    assert evaluate_weight(0.3, 0.5) == 0.3
    assert evaluate_weight(linear_growth, 0.5) == 0.5
