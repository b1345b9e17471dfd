"""``compile="auto"`` (the default): the first calls run eagerly while the step measures them,
then the loss path is compiled only if it dominates the step's forward time."""

from __future__ import annotations

import pytest
import torch

import purekd
from purekd import _compiling
from purekd._compiling import AUTO_MIN_SECONDS, AUTO_SAMPLES, AUTO_WARMUP_CALLS, Compiled
from tests._toys import ToyEncoder, toy_adaptor, toy_batch


def decide(loss_s: float, step_s: float) -> Compiled:
    c = Compiled(lambda x: x, enabled="auto")
    for _ in range(AUTO_WARMUP_CALLS):
        c.observe(99.0, 100.0)  # first calls are not counted
    for _ in range(AUTO_SAMPLES - 1):
        c.observe(loss_s, step_s)
        assert c.deciding and not c.is_compiled
    c.observe(loss_s, step_s)
    assert not c.deciding and c.decision is not None
    return c


@pytest.mark.parametrize("loss_s, step_s, compiles", [
    (0.09, 0.10, True),                        # the loss path dominates: compile
    (0.05, 0.10, True),                        # half: compile
    (0.01, 0.10, False),                       # the models dominate: stay eager
    (0.9 * AUTO_MIN_SECONDS, AUTO_MIN_SECONDS, False),  # dominant but tiny: stay eager
])
def test_the_decision_follows_the_loss_paths_share(loss_s, step_s, compiles):
    c = decide(loss_s, step_s)
    assert c.enabled is compiles and c.is_compiled is compiles
    assert ("compiled" if compiles else "eager") in c.decision
    assert f"{loss_s / step_s:.0%}" in c.decision


def test_auto_runs_eagerly_until_it_decides(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(fn) or fn)
    c = Compiled(lambda x: x + 1, enabled="auto")
    assert c(1) == 2 and not calls  # undecided: eager
    assert c.like(lambda x: x).deciding  # a copy starts from "auto" again
    decided = decide(0.09, 0.1)
    assert decided(1) == 1 and len(calls) == 1


def test_bad_compile_values_are_rejected():
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        Compiled(lambda x: x, enabled="yes")  # type: ignore[arg-type]


def test_the_default_is_auto_and_the_step_feeds_it_measurements(monkeypatch):
    torch.manual_seed(0)
    step = purekd.make_step({}, ToyEncoder(8, 3), ToyEncoder(6), toy_adaptor(), toy_adaptor())
    assert step.loss.deciding
    seen = []
    monkeypatch.setattr(_compiling.Compiled, "observe",
                        lambda self, loss_s, step_s: seen.append((loss_s, step_s)))
    step(toy_batch(0))
    step(toy_batch(1))
    assert len(seen) == 2 and all(0 < loss <= total for loss, total in seen)
    eager = purekd.make_step({}, ToyEncoder(8, 3), ToyEncoder(6), toy_adaptor(), toy_adaptor(),
                             compile=False)
    eager(toy_batch(0))
    assert len(seen) == 2  # only "auto" is measured


def test_the_step_measures_loss_path_and_step_with_its_clock(monkeypatch):
    """Scripted clock readings (start, after the models, after the loss path) per call: the
    models take 1 s, the loss path 3 s -> 75 %, compiled."""
    from purekd.combinators import _step

    readings = iter(t for call in range(AUTO_WARMUP_CALLS + AUTO_SAMPLES)
                    for t in (10.0 * call, 10.0 * call + 1.0, 10.0 * call + 4.0))
    monkeypatch.setattr(_step, "_clock", lambda device: next(readings))
    torch.manual_seed(0)
    step = purekd.make_step({}, ToyEncoder(8, 3), ToyEncoder(6), toy_adaptor(), toy_adaptor())
    step.loss._compiled = step.loss.eager  # no real compilation in this test
    for seed in range(AUTO_WARMUP_CALLS + AUTO_SAMPLES):
        step(toy_batch(seed))
    assert step.loss.enabled is True and "75%" in step.loss.decision
