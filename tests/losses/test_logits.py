"""kd_ce and kd_mse: hand-computed values, TextBrewer equality, compilation, masks, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from textbrewer import losses as tb

from purekd.losses import kd_ce, kd_mse
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

KD = [(kd_ce, tb.kd_ce_loss), (kd_mse, tb.kd_mse_loss)]
KD_IDS = ["kd_ce", "kd_mse"]
LN2, LN3 = math.log(2), math.log(3)

# ---------------------------------------------------------------- hand-computed references
# kd_ce rows:  z^S = [0, ln 3] -> p^S = [1/4, 3/4];  z^T = [0, 0] -> p^T = [1/2, 1/2]
#              CE = -(1/2 ln 1/4 + 1/2 ln 3/4) = 1/2 ln(16/3)
#              z^S = [0, 0], z^T = [0, ln 3]: p^S uniform -> CE = ln 2 for any p^T
CE_ROW0_T1 = 0.5 * math.log(16 / 3)
# at tau = 2: z^S/2 = [0, ln3/2] -> p^S = [1/(1+sqrt3), sqrt3/(1+sqrt3)], p^T still uniform
CE_ROW0_T2 = math.log(1 + math.sqrt(3)) - 0.25 * LN3
CE_ROW1 = LN2


def _ce_logits():
    logits_S = torch.tensor([[[0.0, LN3], [0.0, 0.0]]])  # (1, 2, 2)
    logits_T = torch.tensor([[[0.0, 0.0], [0.0, LN3]]])
    return logits_S, logits_T


def test_kd_ce_hand_computed_2d():
    logits_S, logits_T = _ce_logits()
    s2, t2 = logits_S[0, :1], logits_T[0, :1]  # (1, 2)
    loss = kd_ce(s2, t2)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(CE_ROW0_T1, abs=1e-6)
    assert kd_ce(s2, t2, 2.0).item() == pytest.approx(CE_ROW0_T2, abs=1e-6)
    assert kd_ce(s2, t2, torch.tensor([2.0])).item() == pytest.approx(CE_ROW0_T2, abs=1e-6)


def test_kd_ce_hand_computed_3d_masked_and_per_row_temperature():
    logits_S, logits_T = _ce_logits()
    assert kd_ce(logits_S, logits_T).item() == pytest.approx((CE_ROW0_T1 + CE_ROW1) / 2, abs=1e-6)
    assert kd_ce(logits_S, logits_T, mask=torch.tensor([[1, 0]])).item() == pytest.approx(
        CE_ROW0_T1, abs=1e-6
    )
    assert kd_ce(logits_S, logits_T, mask=torch.tensor([[0, 1]])).item() == pytest.approx(
        CE_ROW1, abs=1e-6
    )
    assert kd_ce(logits_S, logits_T, mask=torch.tensor([[1, 1]])).item() == pytest.approx(
        (CE_ROW0_T1 + CE_ROW1) / 2, abs=1e-6
    )
    tau = torch.tensor([[2.0, 1.0]])  # row 0 at tau 2, row 1 at tau 1
    assert kd_ce(logits_S, logits_T, tau).item() == pytest.approx(
        (CE_ROW0_T2 + CE_ROW1) / 2, abs=1e-6
    )
    assert kd_ce(logits_S, logits_T, tau, torch.tensor([[True, False]])).item() == pytest.approx(
        CE_ROW0_T2, abs=1e-6
    )


def test_kd_mse_hand_computed():
    # rows: S=[1,3] T=[0,1] -> diffs 1, 2;  S=[5,5] T=[0,0] -> diffs 5, 5
    logits_S = torch.tensor([[[1.0, 3.0], [5.0, 5.0]]])
    logits_T = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    assert kd_mse(logits_S[0, :1], logits_T[0, :1]).item() == pytest.approx(2.5)  # (1+4)/2
    assert kd_mse(logits_S[0, :1], logits_T[0, :1], 2.0).item() == pytest.approx(0.625)
    assert kd_mse(logits_S, logits_T).item() == pytest.approx(13.75)  # (1+4+25+25)/4
    assert kd_mse(logits_S, logits_T, mask=torch.tensor([[1, 0]])).item() == pytest.approx(2.5)
    assert kd_mse(logits_S, logits_T, mask=torch.tensor([[0, 1]])).item() == pytest.approx(25.0)
    tau = torch.tensor([[1.0, 5.0]])  # row 1 diffs become 1, 1
    assert kd_mse(logits_S, logits_T, tau).item() == pytest.approx(1.75)  # (1+4+1+1)/4
    assert kd_mse(logits_S, logits_T, tau, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- TextBrewer equality
@pytest.mark.parametrize(("loss", "tb_loss"), KD, ids=KD_IDS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 6)], ids=["2d", "3d"])
def test_matches_textbrewer_unmasked(loss, tb_loss, seed, shape):
    gen = generator(seed)
    logits_S, logits_T = randn(gen, *shape) * 3, randn(gen, *shape) * 3
    tau = torch.rand(shape[:-1], generator=gen) * 4 + 0.5
    for temperature in (1.0, 2.5, torch.tensor(3.0), tau):
        torch.testing.assert_close(
            loss(logits_S, logits_T, temperature),
            tb_loss(logits_S, logits_T, temperature),
            atol=1e-5, rtol=0,
        )
    torch.testing.assert_close(loss(logits_S, logits_T), tb_loss(logits_S, logits_T),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize(("loss", "tb_loss"), KD, ids=KD_IDS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.float32])
def test_masked_matches_textbrewer_on_selected_rows(loss, tb_loss, seed, mask_dtype):
    gen = generator(seed)
    logits_S, logits_T = randn(gen, 3, 5, 4) * 3, randn(gen, 3, 5, 4) * 3
    mask = random_mask(gen, 3, 5, dtype=mask_dtype)
    tau = torch.rand(3, 5, generator=gen) * 4 + 0.5
    rows = mask.bool()
    for temperature, tb_temperature in ((2.0, 2.0), (tau, tau[rows])):
        torch.testing.assert_close(
            loss(logits_S, logits_T, temperature, mask),
            tb_loss(logits_S[rows], logits_T[rows], tb_temperature),
            atol=1e-5, rtol=0,
        )


@pytest.mark.parametrize(("loss", "tb_loss"), KD, ids=KD_IDS)
def test_all_ones_mask_equals_no_mask(loss, tb_loss):
    gen = generator(7)
    logits_S, logits_T = randn(gen, 2, 3, 4), randn(gen, 2, 3, 4)
    torch.testing.assert_close(
        loss(logits_S, logits_T, 2.0, torch.ones(2, 3)), loss(logits_S, logits_T, 2.0),
        atol=1e-6, rtol=0,
    )


# ---------------------------------------------------------------- compilation
@pytest.mark.parametrize("loss", [kd_ce, kd_mse], ids=KD_IDS)
def test_compiles_without_graph_breaks_and_matches_eager(loss):
    gen = generator(3)
    s2, t2 = randn(gen, 3, 4), randn(gen, 3, 4)
    s3, t3 = randn(gen, 2, 3, 4), randn(gen, 2, 3, 4)
    mask = random_mask(gen, 2, 3)
    tau = torch.rand(2, 3, generator=gen) + 1
    calls = [(s2, t2, 2.0), (s3, t3, 2.0), (s3, t3, 2.0, mask), (s3, t3, tau, mask)]
    for call in calls:
        assert count_graph_breaks(loss, *call) == 0
    compiled, eager = compiled_and_eager(loss, calls)
    assert_all_close(compiled, eager, atol=1e-6)


# ---------------------------------------------------------------- purity and gradients
@pytest.mark.parametrize("loss", [kd_ce, kd_mse], ids=KD_IDS)
def test_inputs_untouched(loss):
    gen = generator(4)
    logits_S, logits_T = randn(gen, 2, 3, 4), randn(gen, 2, 3, 4)
    mask, tau = random_mask(gen, 2, 3), torch.rand(2, 3, generator=gen) + 1
    call_and_check_untouched(loss, logits_S, logits_T, 2.0)
    call_and_check_untouched(loss, logits_S, logits_T, tau, mask)


@pytest.mark.parametrize("loss", [kd_ce, kd_mse], ids=KD_IDS)
def test_gradients_with_masked_rows_and_all_masked(loss):
    gen = generator(5)
    logits_S, logits_T = randn(gen, 2, 3, 4), randn(gen, 2, 3, 4)
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])  # batch item 1 wholly masked
    value, (grad,) = student_grads(lambda s: loss(s, logits_T, 2.0, mask), logits_S, [])
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert grad[mask == 1].abs().sum() > 0
    assert torch.equal(grad[mask == 0], torch.zeros_like(grad[mask == 0]))

    value, (grad,) = student_grads(
        lambda s: loss(s, logits_T, 2.0, torch.zeros(2, 3)), logits_S, []
    )
    assert value.item() == 0
    assert torch.equal(grad, torch.zeros_like(grad))


# ---------------------------------------------------------------- properties
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 4), classes=st.integers(2, 6),
       temperature=st.floats(0.5, 8.0), masked=st.booleans())
def test_kd_mse_is_zero_for_identical_logits(seed, rows, classes, temperature, masked):
    gen = generator(seed)
    logits = randn(gen, 2, rows, classes)
    mask = random_mask(gen, 2, rows) if masked else None
    assert kd_mse(logits, logits.clone(), temperature, mask).item() == 0


@given(seed=st.integers(0, 2**31 - 1), classes=st.integers(2, 6),
       temperature=st.floats(0.5, 8.0), scale=st.floats(0.01, 3.0), masked=st.booleans())
def test_kd_ce_is_smallest_when_student_equals_teacher(seed, classes, temperature, scale, masked):
    gen = generator(seed)
    logits_T = randn(gen, 2, 3, classes) * 2
    perturbed = logits_T + scale * randn(gen, 2, 3, classes)
    mask = random_mask(gen, 2, 3) if masked else None
    at_teacher = kd_ce(logits_T, logits_T, temperature, mask)
    assert at_teacher <= kd_ce(perturbed, logits_T, temperature, mask) + 1e-6


# ---------------------------------------------------------------- known divergence
@pytest.mark.parametrize(("loss", "tb_loss"), KD, ids=KD_IDS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_values_in_masked_rows_take_no_part(loss, tb_loss, bad):
    gen = generator(6)
    logits_S, logits_T = randn(gen, 2, 3, 4), randn(gen, 2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    logits_S[0, 2] = bad  # a masked row (e.g. fp16 overflow at a padding position)
    rows = mask.bool()
    expected = tb_loss(logits_S[rows], logits_T[rows], 2.0)
    value, (grad,) = student_grads(lambda s: loss(s, logits_T, 2.0, mask), logits_S, [])
    torch.testing.assert_close(value, expected, atol=1e-5, rtol=0)
    assert torch.isfinite(grad).all()
