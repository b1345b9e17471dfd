"""fsp (gram) and mmd (nst): hand-computed values, TextBrewer equality, compilation, masks,
gradients, purity."""

from __future__ import annotations

import pytest
import torch
from textbrewer import losses as tb

from purekd import losses
from purekd.losses import fsp, mmd
from tests.conftest import (
    assert_all_close,
    call_and_check_untouched,
    compiled_and_eager,
    count_graph_breaks,
    generator,
    randn,
    random_mask,
    student_grads,
)

ALL = [(fsp, tb.fsp_loss), (mmd, tb.mmd_loss)]
IDS = ["fsp", "mmd"]


def _approx(value):
    return pytest.approx(value, abs=1e-6)


def test_aliases():
    assert losses.gram is fsp
    assert losses.nst is mmd


# ---------------------------------------------------------------- hand-computed
EYE = [[1.0, 0.0], [0.0, 1.0]]
S1 = [[1.0, 2.0], [3.0, 4.0]]


def test_fsp_hand_computed():
    s = (torch.tensor([EYE]), torch.tensor([S1]))  # (1, 2, 2) each
    t = (torch.tensor([EYE]), torch.zeros(1, 2, 2))
    # G^S = S0^T S1 / L = [[.5, 1], [1.5, 2]], G^T = 0 -> mean(.25, 1, 2.25, 4)
    loss = fsp(s, t)
    assert loss.shape == ()
    assert loss.item() == _approx(7.5 / 4)
    assert fsp(s, t, torch.tensor([[1, 1]])).item() == _approx(7.5 / 4)
    # mask [1, 0]: position 0 only, n = 1: G^S = [1, 0]^T [1, 2] = [[1, 2], [0, 0]]
    assert fsp(s, t, torch.tensor([[1, 0]])).item() == _approx(5 / 4)
    # mask [0, 1]: G^S = [0, 1]^T [3, 4] = [[0, 0], [3, 4]]
    assert fsp(s, t, torch.tensor([[0, 1]])).item() == _approx(25 / 4)


def test_mmd_hand_computed_different_widths():
    s = (torch.tensor([EYE]), torch.tensor([S1]))  # width 2
    t = (torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]]), torch.ones(1, 2, 3))  # width 3
    # S0 S1^T = [[1, 3], [2, 4]], T0 T1^T = [[3, 3], [0, 0]]
    # no mask: divide by each side's width -> [[.5, 1.5], [1, 2]] - [[1, 1], [0, 0]]
    loss = mmd(s, t)
    assert loss.shape == ()
    assert loss.item() == _approx((0.25 + 0.25 + 1 + 4) / 4)
    # with a mask (TextBrewer): divide both by the length L = 2
    # -> [[.5, 1.5], [1, 2]] - [[1.5, 1.5], [0, 0]] = [[-1, 0], [1, 2]]
    assert mmd(s, t, torch.tensor([[1, 1]])).item() == _approx((1 + 0 + 1 + 4) / 4)
    assert mmd(s, t, torch.tensor([[1, 0]])).item() == _approx(1.0)
    assert mmd(s, t, torch.tensor([[0, 1]])).item() == _approx(4.0)


# ---------------------------------------------------------------- TextBrewer equality
def _pairs(gen, width_S, width_T, batch=3, length=5):
    s = (randn(gen, batch, length, width_S), randn(gen, batch, length, width_S))
    t = (randn(gen, batch, length, width_T), randn(gen, batch, length, width_T))
    return s, t


@pytest.mark.parametrize(("loss", "tb_loss"), ALL, ids=IDS)
@pytest.mark.parametrize("seed", range(5))
def test_matches_textbrewer(loss, tb_loss, seed):
    gen = generator(seed)
    s, t = _pairs(gen, 4, 4)
    mask = random_mask(gen, 3, 5, dtype=[torch.long, torch.bool, torch.float32][seed % 3])
    torch.testing.assert_close(loss(s, t), tb_loss(s, t), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss(s, t, mask), tb_loss(s, t, mask), atol=1e-5, rtol=0)
    # lists work as well as tuples
    torch.testing.assert_close(loss(list(s), list(t), mask), tb_loss(s, t, mask),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_mmd_matches_textbrewer_with_different_widths(seed):
    gen = generator(seed)
    s, t = _pairs(gen, 3, 7)
    mask = random_mask(gen, 3, 5)
    torch.testing.assert_close(mmd(s, t), tb.mmd_loss(s, t), atol=1e-5, rtol=0)
    torch.testing.assert_close(mmd(s, t, mask), tb.mmd_loss(s, t, mask), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- compilation
@pytest.mark.parametrize("loss", [fsp, mmd], ids=IDS)
def test_compiles_without_graph_breaks_and_matches_eager(loss):
    gen = generator(31)
    width_T = 3 if loss is fsp else 5
    s, t = _pairs(gen, 3, width_T, batch=2, length=3)
    mask = random_mask(gen, 2, 3)
    calls = [(s, t), (s, t, mask)]
    for call in calls:
        assert count_graph_breaks(loss, *call) == 0
    compiled, eager = compiled_and_eager(loss, calls)
    assert_all_close(compiled, eager, atol=1e-6)


# ---------------------------------------------------------------- purity and gradients
@pytest.mark.parametrize("loss", [fsp, mmd], ids=IDS)
def test_inputs_untouched(loss):
    gen = generator(32)
    s, t = _pairs(gen, 3, 3, batch=2, length=3)
    mask = random_mask(gen, 2, 3)
    call_and_check_untouched(loss, s, t)
    call_and_check_untouched(loss, s, t, mask)


@pytest.mark.parametrize("loss", [fsp, mmd], ids=IDS)
def test_gradients_with_masked_rows_and_all_masked(loss):
    gen = generator(33)
    s, t = _pairs(gen, 3, 3, batch=2, length=3)
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])  # batch item 1 wholly masked
    value, grads = student_grads(lambda x: loss(x, t, mask), s, [])
    assert torch.isfinite(value)
    for grad in grads:
        assert torch.isfinite(grad).all()
        assert grad[0].abs().sum() > 0
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))

    value, grads = student_grads(lambda x: loss(x, t, torch.zeros(2, 3)), s, [])
    assert value.item() == 0
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))
