"""Projection builders: initialisation, activation, TextBrewer's RNG order."""

from __future__ import annotations

import pytest
import torch
from textbrewer import projections as tb

from purekd import projections

BUILDERS = [
    (projections.linear, tb.linear_projection, None),
    (projections.relu, tb.projection_with_activation("ReLU"), torch.nn.ReLU),
    (projections.tanh, tb.projection_with_activation("Tanh"), torch.nn.Tanh),
]
IDS = ["linear", "relu", "tanh"]


def _linear(module):
    return module if isinstance(module, torch.nn.Linear) else module[0]


@pytest.mark.parametrize(("build", "tb_build", "activation"), BUILDERS, ids=IDS)
@pytest.mark.parametrize(("dim_in", "dim_out"), [(3, 5), (8, 2)])
def test_same_seed_same_projection_as_textbrewer(build, tb_build, activation, dim_in, dim_out):
    torch.manual_seed(99)
    ours = build(dim_in, dim_out)
    torch.manual_seed(99)
    theirs = tb_build(dim_in, dim_out)
    assert type(ours) is type(theirs)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    for key in theirs_state:
        assert torch.equal(ours_state[key], theirs_state[key]), key


@pytest.mark.parametrize(("build", "tb_build", "activation"), BUILDERS, ids=IDS)
def test_structure_and_initialisation(build, tb_build, activation):
    torch.manual_seed(0)
    proj = build(300, 200)
    linear = _linear(proj)
    assert linear.in_features == 300 and linear.out_features == 200
    assert torch.equal(linear.bias, torch.zeros(200))
    assert abs(linear.weight.mean().item()) < 1e-3
    assert linear.weight.std().item() == pytest.approx(projections.PROJECTION_INIT_STD, rel=0.02)
    if activation is None:
        assert isinstance(proj, torch.nn.Linear)
    else:
        assert isinstance(proj, torch.nn.Sequential) and len(proj) == 2
        assert isinstance(proj[1], activation)
    x = torch.randn(4, 300) * 30
    expected = x @ linear.weight.T
    if activation is not None:
        expected = activation()(expected)
    torch.testing.assert_close(proj(x), expected)


def test_with_activation_builds_a_new_module_each_time():
    build = projections.with_activation(torch.nn.GELU)
    a, b = build(2, 3), build(2, 3)
    assert isinstance(a[1], torch.nn.GELU)
    assert a[1] is not b[1]
    assert a[0].weight is not b[0].weight
    x = torch.randn(5, 2)
    torch.testing.assert_close(a(x), torch.nn.functional.gelu(x @ a[0].weight.T))
