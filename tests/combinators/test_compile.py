"""``compiled``: the loss path under ``torch.compile`` equals eager, has no graph break, does
not recompile when progress changes, and falls back to eager when compilation fails."""

from __future__ import annotations

import warnings

import pytest
import torch

from purekd.combinators import Compiled, compiled
from purekd.terms import make_context
from tests._toys import ToyEncoder, assert_tree_close, make_step, toy_adaptor, toy_batch
from tests.conftest import count_graph_breaks

MATCHES = [
    {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
     "proj": ["linear", 6, 8]},
    {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "cos", "weight": 0.5,
     "proj": ["relu", 6, 8]},
    {"layer_T": 1, "layer_S": 0, "feature": "hidden", "loss": "pkd", "weight": 0.5,
     "proj": ["tanh", 6, 8]},
    {"layer_T": [0, 2], "layer_S": [0, 1], "feature": "hidden", "loss": "fsp", "weight": 0.5,
     "proj": ["tanh", 6, 8]},
    {"layer_T": [1, 3], "layer_S": [1, 2], "feature": "hidden", "loss": "mmd", "weight": 0.5},
    {"layer_T": 2, "layer_S": 1, "feature": "attention", "loss": "attention_ce", "weight": 0.2},
    {"layer_T": 1, "layer_S": 1, "feature": "attention", "loss": "attention_mse", "weight": 0.2},
    {"layer_T": 0, "layer_S": 0, "feature": "attention", "loss": "attention_ce_mean", "weight": 1},
    {"layer_T": 2, "layer_S": 0, "feature": "attention", "loss": "attention_mse_sum", "weight": 1},
]
SEQUENCE = ({}, {}, {"temperature": 3, "temperature_scheduler": ["flsw", 1, 2],
                     "probability_shift": True, "hard_label_weight": 0.5,
                     "kd_loss_weight_scheduler": "linear_decay",
                     "hard_label_weight_scheduler": "linear_growth",
                     "intermediate_matches": MATCHES})
TOKENS = ({"token_level": True, "n_logits": 2}, {"logits_mask": True},
          {"kd_loss_type": "mse", "temperature_scheduler": ["cwsm", 1],
           "intermediate_matches": MATCHES[:2]})
PROGRESS = (0.0, 0.1, 0.5, 0.9)


def build(case, *, compile):
    model_kwargs, adaptor_kwargs, config = case
    torch.manual_seed(0)
    teacher, student = ToyEncoder(8, 3, **model_kwargs), ToyEncoder(6, **model_kwargs)
    adaptor = toy_adaptor(**adaptor_kwargs)
    step = make_step(config, teacher, student, adaptor, adaptor, compile=compile)
    return step, toy_batch(token_level=model_kwargs.get("token_level", False))


def grads_of(step, loss):
    params = list(step.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


SMALL = ({}, {}, {**SEQUENCE[2], "intermediate_matches": [MATCHES[0], MATCHES[5]]})


def test_compiled_make_step_equals_eager():
    """The one test that pays for a real inductor compilation (forward and backward), so it
    uses a smaller configuration: logits KD (flsw, probability shift, weight schedules), a
    projected hidden match and a masked attention match."""
    with torch._inductor.config.patch(compile_threads=1):  # 2 shared CPU cores
        _compiled_equals_eager()


def _compiled_equals_eager() -> None:
    eager, batch = build(SMALL, compile=False)
    fast, _ = build(SMALL, compile=True)
    assert fast.loss.is_compiled
    for progress in (0.0, 0.6):
        want, got = eager(batch, progress=progress), fast(batch, progress=progress)
        assert_tree_close(got.terms, want.terms)
        torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)
        for a, b in zip(grads_of(fast, got.loss), grads_of(eager, want.loss), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert fast.loss.fallback_reason is None  # it really ran compiled


@pytest.mark.parametrize("case", [SEQUENCE, TOKENS], ids=["sequence", "tokens"])
def test_loss_path_has_no_graph_break(case):
    step, batch = build(case, compile=True)
    outputs = step.outputs(batch)
    ctx = make_context(0.3)
    assert count_graph_breaks(step.loss.eager, outputs.student, outputs.teacher, ctx) == 0


@pytest.mark.parametrize("case", [SEQUENCE, TOKENS], ids=["sequence", "tokens"])
def test_changing_progress_does_not_recompile(case):
    step, batch = build(case, compile=False)
    reference = [step(batch, progress=p, step=i) for i, p in enumerate(PROGRESS)]
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step.loss = compiled(step.loss.eager, backend=counting_backend, fullgraph=True)
    for i, progress in enumerate(PROGRESS):
        out = step(batch, progress=progress, step=i)
        torch.testing.assert_close(out.loss, reference[i].loss)
        out.loss.backward()
    assert len(graphs) == 1


def test_compiled_equals_eager_on_a_plain_function():
    def f(x, y):
        return (x.softmax(-1) * y).sum(), {"max": x.amax()}

    x, y = torch.randn(3, 4), torch.randn(3, 4)
    c = compiled(f, backend="aot_eager", fullgraph=True)
    assert isinstance(c, Compiled) and c.is_compiled
    assert_tree_close(c(x, y), f(x, y))
    assert c.fallback_reason is None


def test_disabled_never_compiles(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled"))
    c = compiled(torch.sin, enabled=False)
    x = torch.randn(3)
    torch.testing.assert_close(c(x), torch.sin(x))
    assert not c.is_compiled


def _failing_compile(*args, **kwargs):
    def broken(*a, **k):
        raise RuntimeError("inductor exploded: no C compiler")
    return broken


def test_failed_compilation_warns_once_and_runs_eagerly(monkeypatch):
    monkeypatch.setattr(torch, "compile", _failing_compile)
    calls = []

    def f(x):
        calls.append(x)
        return x * 2

    c = compiled(f)
    x = torch.arange(3.0)
    with pytest.warns(RuntimeWarning, match="inductor exploded") as record:
        result = c(x)
    assert len(record) == 1
    torch.testing.assert_close(result, x * 2)
    assert not c.is_compiled and "RuntimeError" in c.fallback_reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        torch.testing.assert_close(c(x + 1), (x + 1) * 2)
    assert len(calls) == 2


def test_a_genuine_error_is_raised_as_the_eager_error(monkeypatch):
    monkeypatch.setattr(torch, "compile", _failing_compile)

    def f(x):
        raise ValueError(f"bad input of shape {tuple(x.shape)}")

    c = compiled(f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        with pytest.raises(ValueError, match=r"bad input of shape \(3,\)"):
            c(torch.zeros(3))
    assert c.fallback_reason is None


def test_a_genuine_error_under_real_compilation_is_the_eager_error():
    def f(x):
        return x @ torch.ones(5, 2)  # shapes do not fit

    c = compiled(f, backend="eager")
    with pytest.raises(RuntimeError, match="cannot be multiplied") as info:
        c(torch.zeros(3, 4))
    assert "torch._dynamo" not in type(info.value).__module__


def test_compiled_forwards_attributes_of_the_function():
    def f(x):
        return x

    f.check = "here"
    assert compiled(f).check == "here"
