"""Weight schedules: functions of training progress, on floats and on 0-dim tensors."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from textbrewer import schedulers as tb

from purekd.schedules import constant_weight, linear_decay, linear_growth

PROGRESS = [0.0, 0.1, 0.25, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("progress", PROGRESS)
def test_linear_decay_and_growth_on_floats(progress):
    assert linear_decay(progress) == pytest.approx(1 - progress)
    assert linear_growth(progress) == progress
    assert linear_decay(progress) == tb.linear_decay_weight_scheduler(progress)
    assert linear_growth(progress) == tb.linear_growth_weight_scheduler(progress)
    assert isinstance(linear_decay(progress), float)


def test_end_points():
    assert linear_decay(0.0) == 1.0 and linear_decay(1.0) == 0.0
    assert linear_growth(0.0) == 0.0 and linear_growth(1.0) == 1.0


@pytest.mark.parametrize("progress", PROGRESS)
def test_linear_decay_and_growth_on_0dim_tensors(progress):
    p = torch.tensor(progress)
    decay, growth = linear_decay(p), linear_growth(p)
    assert isinstance(decay, torch.Tensor) and decay.shape == ()
    assert isinstance(growth, torch.Tensor) and growth.shape == ()
    assert decay.item() == pytest.approx(1 - progress)
    assert growth.item() == pytest.approx(progress)
    assert torch.equal(p, torch.tensor(progress))  # input untouched


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0, 2.5])
def test_constant_weight(value):
    schedule = constant_weight(value)
    for progress in PROGRESS:
        assert schedule(progress) == value
        assert isinstance(schedule(progress), float)
        out = schedule(torch.tensor(progress))
        assert isinstance(out, torch.Tensor) and out.shape == ()
        assert out.item() == pytest.approx(value)


def test_tensor_progress_compiles_once_for_every_value():
    """Progress as a 0-dim tensor: one compiled graph serves every value."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()

    def weights(p):
        return linear_decay(p) + 2 * linear_growth(p) + constant_weight(0.5)(p)

    compiled = torch.compile(weights, backend=counter, fullgraph=True)
    for progress in (0.0, 0.3, 0.7):
        out = compiled(torch.tensor(progress))
        assert out.item() == pytest.approx(1 - progress + 2 * progress + 0.5)
    assert counter.frame_count == 1
