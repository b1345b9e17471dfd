"""hidden_mse, cos, pkd: hand-computed values, TextBrewer equality, compilation, masks,
gradients, purity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from textbrewer import losses as tb

from purekd.losses import cos, hidden_mse, pkd
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

ALL = [(hidden_mse, tb.hid_mse_loss), (cos, tb.cos_loss), (pkd, tb.pkd_loss)]
IDS = ["hidden_mse", "cos", "pkd"]


def _approx(value):
    return pytest.approx(value, abs=1e-6)


# ---------------------------------------------------------------- hand-computed
def test_hidden_mse_hand_computed():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (1, 2, 2)
    t = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    # squared differences [[1, 4], [4, 9]]
    loss = hidden_mse(s, t)
    assert loss.shape == ()
    assert loss.item() == _approx(18 / 4)
    assert hidden_mse(s, t, torch.tensor([[1, 0]])).item() == _approx(5 / 2)
    assert hidden_mse(s, t, torch.tensor([[0, 1]])).item() == _approx(13 / 2)
    assert hidden_mse(s, t, torch.tensor([[1, 1]])).item() == _approx(18 / 4)


def test_cos_hand_computed():
    s = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])
    t = torch.tensor([[[0.0, 1.0], [4.0, 3.0]]])
    # row 0: orthogonal -> 1 - 0 = 1;  row 1: cos = 24/25 -> 1/25
    loss = cos(s, t)
    assert loss.shape == ()
    assert loss.item() == _approx((1 + 0.04) / 2)
    assert cos(s, t, torch.tensor([[1, 0]])).item() == _approx(1.0)
    assert cos(s, t, torch.tensor([[0, 1]])).item() == _approx(0.04)
    assert cos(s[0], t[0]).item() == _approx((1 + 0.04) / 2)  # 2-d rows


def test_pkd_hand_computed():
    # position 0 of each item; position 1 is ignored (large values that would change the loss)
    s = torch.tensor([[[3.0, 4.0], [100.0, -7.0]], [[1.0, 0.0], [5.0, 5.0]]])  # (2, 2, 2)
    t = torch.tensor([[[4.0, 3.0], [-9.0, 1.0]], [[0.0, 2.0], [1.0, 8.0]]])
    # item 0: [.6, .8] vs [.8, .6] -> .04 + .04;  item 1: [1, 0] vs [0, 1] -> 2
    loss = pkd(s, t)
    assert loss.shape == ()
    assert loss.item() == _approx((0.08 + 2) / 2)
    assert pkd(s[:, 0], t[:, 0]).item() == _approx((0.08 + 2) / 2)  # 2-d states
    assert pkd(s, t, torch.tensor([[1, 0], [0, 0]])).item() == _approx((0.08 + 2) / 2)  # ignored


# ---------------------------------------------------------------- TextBrewer equality
@pytest.mark.parametrize(("loss", "tb_loss"), ALL, ids=IDS)
@pytest.mark.parametrize("seed", range(5))
def test_matches_textbrewer(loss, tb_loss, seed):
    gen = generator(seed)
    s, t = randn(gen, 3, 5, 4), randn(gen, 3, 5, 4)
    mask = random_mask(gen, 3, 5, dtype=[torch.long, torch.bool, torch.float32][seed % 3])
    torch.testing.assert_close(loss(s, t), tb_loss(s, t), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss(s, t, mask), tb_loss(s, t, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("loss", "tb_loss"), ALL, ids=IDS)
@pytest.mark.parametrize("seed", range(3))
def test_matches_textbrewer_2d(loss, tb_loss, seed):
    gen = generator(seed)
    s, t = randn(gen, 4, 6), randn(gen, 4, 6)
    torch.testing.assert_close(loss(s, t), tb_loss(s, t), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- compilation
@pytest.mark.parametrize("loss", [a for a, _ in ALL], ids=IDS)
def test_compiles_without_graph_breaks_and_matches_eager(loss):
    gen = generator(21)
    s, t = randn(gen, 2, 3, 4), randn(gen, 2, 3, 4)
    mask = random_mask(gen, 2, 3)
    calls = [(s, t), (s, t, mask)]
    if loss is pkd:
        calls.append((s[:, 0], t[:, 0]))
    for call in calls:
        assert count_graph_breaks(loss, *call) == 0
    compiled, eager = compiled_and_eager(loss, calls)
    assert_all_close(compiled, eager, atol=1e-6)


# ---------------------------------------------------------------- purity and gradients
@pytest.mark.parametrize("loss", [a for a, _ in ALL], ids=IDS)
def test_inputs_untouched(loss):
    gen = generator(22)
    s, t = randn(gen, 2, 3, 4), randn(gen, 2, 3, 4)
    mask = random_mask(gen, 2, 3)
    call_and_check_untouched(loss, s, t)
    call_and_check_untouched(loss, s, t, mask)


@pytest.mark.parametrize("loss", [hidden_mse, cos], ids=["hidden_mse", "cos"])
def test_gradients_with_masked_rows_and_all_masked(loss):
    gen = generator(23)
    s, t = randn(gen, 2, 3, 4), randn(gen, 2, 3, 4)
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    value, (grad,) = student_grads(lambda x: loss(x, t, mask), s, [])
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert grad[mask == 1].abs().sum() > 0
    assert torch.equal(grad[mask == 0], torch.zeros_like(grad[mask == 0]))

    value, (grad,) = student_grads(lambda x: loss(x, t, torch.zeros(2, 3)), s, [])
    assert value.item() == 0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_pkd_ignores_the_mask_and_keeps_finite_gradients():
    gen = generator(24)
    s, t = randn(gen, 2, 3, 4), randn(gen, 2, 3, 4)
    unmasked, (grad_unmasked,) = student_grads(lambda x: pkd(x, t), s, [])
    for mask in (torch.tensor([[1, 0, 1], [0, 0, 0]]), torch.zeros(2, 3)):
        value, (grad,) = student_grads(lambda x, m=mask: pkd(x, t, m), s, [])
        assert torch.isfinite(grad).all()
        assert torch.equal(value, unmasked)
        assert torch.equal(grad, grad_unmasked)
    assert torch.equal(grad_unmasked[:, 1:], torch.zeros_like(grad_unmasked[:, 1:]))


# ---------------------------------------------------------------- properties
@given(seed=st.integers(0, 2**31 - 1), length=st.integers(1, 4), width=st.integers(1, 6),
       masked=st.booleans())
def test_hidden_mse_is_zero_for_identical_states(seed, length, width, masked):
    gen = generator(seed)
    state = randn(gen, 2, length, width)
    mask = random_mask(gen, 2, length) if masked else None
    assert hidden_mse(state, state.clone(), mask).item() == 0


@given(seed=st.integers(0, 2**31 - 1), length=st.integers(1, 4), width=st.integers(1, 6),
       scale=st.floats(1e-2, 1e2), masked=st.booleans())
def test_cos_is_zero_for_identical_states(seed, length, width, scale, masked):
    gen = generator(seed)
    # every entry at least 0.5 * scale in size, so that the norms dwarf the 1e-12 epsilon
    noise = randn(gen, 2, length, width)
    state = (noise.abs() + 0.5) * torch.where(noise < 0, -1.0, 1.0) * scale
    mask = random_mask(gen, 2, length) if masked else None
    assert abs(cos(state, state.clone(), mask).item()) < 1e-5
    # and for states that differ only by a positive factor
    assert abs(cos(state, state * 3.5, mask).item()) < 1e-5


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_cos_non_finite_values_in_masked_positions_take_no_part(bad):
    gen = generator(25)
    s, t = randn(gen, 2, 3, 4), randn(gen, 2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    s[0, 2, 1] = bad
    torch.testing.assert_close(cos(s, t, mask), tb.cos_loss(s, t, mask), atol=1e-5, rtol=0)
