"""The step over explicit parameters: ``torch.func`` gradients equal ``.backward()``'s."""

from __future__ import annotations

import pytest
import torch

from purekd.combinators import compiled
from purekd.functional import (
    functional_step,
    load_params,
    loss_and_terms,
    sgd_update,
    trainable_params,
)
from tests._toys import ATOL, ToyEncoder, assert_tree_close, make_step, toy_adaptor, toy_batch

MATCHES = [
    {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
     "proj": ["linear", 6, 8]},
    {"layer_T": [0, 1], "layer_S": [0, 1], "feature": "hidden", "loss": "fsp", "weight": 0.7,
     "proj": ["tanh", 6, 8]},
    {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "cos", "weight": 1,
     "proj": ["relu", 6, 8]},
    {"layer_T": 1, "layer_S": 1, "feature": "attention", "loss": "attention_ce", "weight": 0.3},
]
CONFIG = {"temperature": 3, "hard_label_weight": 0.5, "temperature_scheduler": ["flsw", 1, 2],
          "probability_shift": True, "kd_loss_weight_scheduler": "linear_decay",
          "intermediate_matches": MATCHES}


def build(compile=False):
    torch.manual_seed(0)
    teacher, student = ToyEncoder(8, 3), ToyEncoder(6)
    return make_step(CONFIG, teacher, student, toy_adaptor(), toy_adaptor(), compile=compile)


def test_trainable_params_are_student_and_projections():
    step = build()
    params = trainable_params(step)
    assert set(params) == {name for name, _ in step.named_parameters()}
    assert any(name.startswith("projections.") for name in params)
    assert not any(p.requires_grad for p in params.values())


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compile=True"])
def test_grad_and_value_equals_backward(compile, monkeypatch):
    step = build(compile=compile)
    # inside a torch.func transform the loss path runs eagerly: compiling would be an error
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled in a transform"))
    batch = toy_batch()
    grads, (loss, terms) = torch.func.grad_and_value(loss_and_terms(step), has_aux=True)(
        trainable_params(step), batch, progress=0.3)
    step.zero_grad()
    step.loss.enabled = False  # the reference runs eagerly, without touching torch.compile
    out = step(batch, progress=0.3)
    out.loss.backward()
    torch.testing.assert_close(loss, out.loss.detach(), atol=ATOL, rtol=0)
    assert_tree_close(terms, {k: v.detach() for k, v in out.terms.items()})
    for name, p in step.named_parameters():
        expected = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(grads[name], expected, atol=ATOL, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert any(name.startswith("projections.") and g.abs().sum() > 0 for name, g in grads.items())


def test_functional_step_swaps_parameters_in():
    step = build()
    batch = toy_batch()
    params = trainable_params(step)
    shifted = {name: p + 0.01 for name, p in params.items()}
    got = functional_step(step)(shifted, batch, progress=0.5)
    load_params(step, shifted)
    expected = step(batch, progress=0.5)
    torch.testing.assert_close(got.loss, expected.loss)
    load_params(step, params)
    assert_tree_close(trainable_params(step), params, atol=0)  # restored


def test_functional_sgd_equals_torch_optim_sgd():
    step, reference = build(), build()
    batches = [toy_batch(seed=i) for i in range(3)]
    params = trainable_params(step)
    grad_fn = torch.func.grad(lambda p, b, **kw: loss_and_terms(step)(p, b, **kw)[0])
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for i, batch in enumerate(batches):
        params = sgd_update(params, grad_fn(params, batch, progress=i / 3), lr=0.1)
        reference(batch, progress=i / 3).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_tree_close(params, trainable_params(reference), atol=ATOL)


def test_functional_step_through_a_compiled_loss_path_sees_the_swapped_projections():
    """Outside a transform the loss path runs compiled; the projections it calls must be the
    swapped-in tensors, not stale ones captured at compilation."""
    step = build()
    step.loss = compiled(step.loss.eager, backend="eager")  # Dynamo guards, no inductor cost
    batch = toy_batch()
    params = trainable_params(step)
    step(batch)  # compile with the module's own tensors first
    for shift in (0.05, -0.05):
        shifted = {name: p + shift for name, p in params.items()}
        got = functional_step(step)(shifted, batch, progress=0.5)
        load_params(step, shifted)
        step.loss.enabled = False
        expected = step(batch, progress=0.5)
        step.loss.enabled = True
        load_params(step, params)
        torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
        assert_tree_close(got.terms, expected.terms)
    assert step.loss.is_compiled
