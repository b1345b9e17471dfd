"""Attention losses: hand-computed values, TextBrewer equality (incl. the padding rule),
compilation, masks, gradients, purity."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from textbrewer import losses as tb

from purekd.losses import attention_ce, attention_ce_mean, attention_mse, attention_mse_sum
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

ALL = [
    (attention_mse, tb.att_mse_loss),
    (attention_mse_sum, tb.att_mse_sum_loss),
    (attention_ce, tb.att_ce_loss),
    (attention_ce_mean, tb.att_ce_mean_loss),
]
IDS = ["attention_mse", "attention_mse_sum", "attention_ce", "attention_ce_mean"]
# TextBrewer's masked formula for attention_mse / attention_ce only makes sense for 4-d inputs.
HEAD_REDUCING = ALL[1::2]
HEAD_REDUCING_IDS = IDS[1::2]
LN2, LN3 = math.log(2), math.log(3)


def _approx(value):
    return pytest.approx(value, abs=1e-6)


# ---------------------------------------------------------------- hand-computed: MSE
S1 = [[0.5, 0.5], [0.2, 0.8]]
T1 = [[1.0, 0.0], [0.0, 1.0]]
# squared differences: [[.25, .25], [.04, .04]] -> mean .58 / 4 = .145


def test_attention_mse_hand_computed():
    s, t = torch.tensor([[S1]]), torch.tensor([[T1]])  # (1, 1, 2, 2)
    loss = attention_mse(s, t)
    assert loss.shape == ()
    assert loss.item() == _approx(0.145)
    assert attention_mse(s, t, torch.tensor([[1, 1]])).item() == _approx(0.145)
    assert attention_mse(s, t, torch.tensor([[1, 0]])).item() == _approx(0.25)  # entry (0, 0)
    assert attention_mse(s, t, torch.tensor([[0, 1]])).item() == _approx(0.04)  # entry (1, 1)
    # two heads, the second identical: the denominator counts H * (sum m)^2 = 2
    s2 = torch.tensor([[S1, T1]])
    t2 = torch.tensor([[T1, T1]])
    assert attention_mse(s2, t2).item() == _approx(0.58 / 8)
    assert attention_mse(s2, t2, torch.tensor([[1, 0]])).item() == _approx(0.25 / 2)


def test_attention_mse_padding_rule_hand_computed():
    # no mask: entries <= -1e-3 count as 0 on both sides
    s = torch.tensor([[[[0.5, -10000.0], [-0.002, 0.8]]]])
    t = torch.tensor([[[[1.0, -10000.0], [0.3, 1.0]]]])
    # differences: -.5, 0 (both padding), -.3 (student's -0.002 zeroed), -.2
    assert attention_mse(s, t).item() == _approx((0.25 + 0.0 + 0.09 + 0.04) / 4)
    assert attention_mse_sum(s[:, 0], t[:, 0]).item() == _approx((0.25 + 0.09 + 0.04) / 4)


def test_attention_mse_sum_hand_computed():
    s = torch.tensor([[S1, S1]])  # heads sum to [[1, 1], [.4, 1.6]]
    t = torch.tensor([[T1, T1]])  # heads sum to [[2, 0], [0, 2]]
    # squared differences [[1, 1], [.16, .16]]
    assert attention_mse_sum(s, t).item() == _approx(2.32 / 4)
    assert attention_mse_sum(s, t, torch.tensor([[1, 0]])).item() == _approx(1.0)
    assert attention_mse_sum(s, t, torch.tensor([[0, 1]])).item() == _approx(0.16)
    # 3-d input: a single head
    s3, t3 = torch.tensor([S1]), torch.tensor([T1])
    assert attention_mse_sum(s3, t3).item() == _approx(0.145)
    assert attention_mse_sum(s3, t3, torch.tensor([[0, 1]])).item() == _approx(0.04)
    assert attention_mse_sum(s3, t3, torch.tensor([[1, 0]])).item() == _approx(0.25)


# ---------------------------------------------------------------- hand-computed: CE
# rows: S=[0, ln3] -> p^S=[1/4, 3/4]; S=[0, 0] -> p^S=[1/2, 1/2]
#       T=[0, 0]   -> p^T=[1/2, 1/2]; T=[0, ln3] -> p^T=[1/4, 3/4]
CE_S = [[0.0, LN3], [0.0, 0.0]]
CE_T = [[0.0, 0.0], [0.0, LN3]]
CE_ROW0 = 0.5 * math.log(16 / 3)  # -(1/2 ln 1/4 + 1/2 ln 3/4)
CE_ROW1 = LN2  # -(1/4 + 3/4) ln 1/2


def test_attention_ce_hand_computed():
    s, t = torch.tensor([[CE_S]]), torch.tensor([[CE_T]])
    loss = attention_ce(s, t)
    assert loss.shape == ()
    assert loss.item() == _approx((CE_ROW0 + CE_ROW1) / 2)
    assert attention_ce(s, t, torch.tensor([[1, 1]])).item() == _approx((CE_ROW0 + CE_ROW1) / 2)
    # mask [1, 0]: query row 0, key 0 only: -p^T_00 log p^S_00 = -1/2 ln 1/4 = ln 2
    assert attention_ce(s, t, torch.tensor([[1, 0]])).item() == _approx(LN2)
    # mask [0, 1]: query row 1, key 1 only: -3/4 ln 1/2
    assert attention_ce(s, t, torch.tensor([[0, 1]])).item() == _approx(0.75 * LN2)
    # two heads: the denominator is H * sum(m)
    s2 = torch.tensor([[CE_S, CE_S]])
    t2 = torch.tensor([[CE_T, CE_T]])
    assert attention_ce(s2, t2, torch.tensor([[1, 0]])).item() == _approx(LN2)


def test_attention_ce_padding_rule_hand_computed():
    # teacher entry -10000 is padding: p^T = [1, ~0] and the padded entry is zeroed anyway
    s = torch.tensor([[CE_S]])
    t = torch.tensor([[[[0.0, -10000.0], [0.0, LN3]]]])
    # row 0: -1 * ln 1/4 = ln 4;  row 1: ln 2
    assert attention_ce(s, t).item() == _approx((2 * LN2 + LN2) / 2)
    # a teacher entry of -0.5 is treated as padding: its probability is dropped
    t_neg = torch.tensor([[[[-0.5, 0.0], [0.0, LN3]]]])
    kept = math.exp(0.5) / (1 + math.exp(0.5))  # softmax([-0.5, 0])[1]
    assert attention_ce(s, t_neg).item() == _approx((-kept * math.log(0.75) + LN2) / 2)


def test_attention_ce_mean_hand_computed():
    # heads average to CE_S / CE_T
    s = torch.tensor([[[[0.0, 2 * LN3], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 0.0], [0.0, 2 * LN3]], [[0.0, 0.0], [0.0, 0.0]]]])
    assert attention_ce_mean(s, t).item() == _approx((CE_ROW0 + CE_ROW1) / 2)
    assert attention_ce_mean(s, t, torch.tensor([[1, 0]])).item() == _approx(LN2)
    assert attention_ce_mean(s, t, torch.tensor([[0, 1]])).item() == _approx(0.75 * LN2)
    s3, t3 = torch.tensor([CE_S]), torch.tensor([CE_T])
    assert attention_ce_mean(s3, t3).item() == _approx((CE_ROW0 + CE_ROW1) / 2)
    assert attention_ce_mean(s3, t3, torch.tensor([[1, 0]])).item() == _approx(LN2)


# ---------------------------------------------------------------- TextBrewer equality
def _attention(gen, *shape):
    return randn(gen, *shape) * 2


@pytest.mark.parametrize(("loss", "tb_loss"), ALL, ids=IDS)
@pytest.mark.parametrize("seed", range(4))
def test_matches_textbrewer_4d(loss, tb_loss, seed):
    gen = generator(seed)
    s, t = _attention(gen, 3, 2, 5, 5), _attention(gen, 3, 2, 5, 5)
    mask = random_mask(gen, 3, 5, dtype=[torch.long, torch.bool, torch.float32][seed % 3])
    torch.testing.assert_close(loss(s, t), tb_loss(s, t), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss(s, t, mask), tb_loss(s, t, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("loss", "tb_loss"), ALL, ids=IDS)
@pytest.mark.parametrize("seed", range(4))
def test_matches_textbrewer_3d_unmasked(loss, tb_loss, seed):
    gen = generator(seed)
    s, t = _attention(gen, 3, 5, 5), _attention(gen, 3, 5, 5)
    torch.testing.assert_close(loss(s, t), tb_loss(s, t), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("loss", "tb_loss"), HEAD_REDUCING, ids=HEAD_REDUCING_IDS)
@pytest.mark.parametrize("seed", range(4))
def test_matches_textbrewer_3d_masked(loss, tb_loss, seed):
    gen = generator(seed)
    s, t = _attention(gen, 3, 5, 5), _attention(gen, 3, 5, 5)
    mask = random_mask(gen, 3, 5)
    torch.testing.assert_close(loss(s, t, mask), tb_loss(s, t, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("loss", "tb_loss"), ALL, ids=IDS)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dims", [3, 4])
def test_padding_entries_match_textbrewer_without_mask(loss, tb_loss, seed, dims):
    """Attention scores with a -10000 additive padding mask: no mask is given, the entries
    <= -1e-3 count as masked, as in TextBrewer."""
    gen = generator(seed)
    shape = (3, 2, 5, 5) if dims == 4 else (3, 5, 5)
    keys = random_mask(gen, 3, 5).bool()  # key positions that are real tokens
    pad = (~keys).reshape(3, *([1] * (dims - 2)), 5).expand(shape)
    # softmax-like non-negative scores, so that only the padding is <= -1e-3
    s = torch.rand(shape, generator=gen).masked_fill(pad, -10000.0)
    t = torch.rand(shape, generator=gen).masked_fill(pad, -10000.0)
    torch.testing.assert_close(loss(s, t), tb_loss(s, t), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- compilation
@pytest.mark.parametrize("loss", [a for a, _ in ALL], ids=IDS)
def test_compiles_without_graph_breaks_and_matches_eager(loss):
    gen = generator(11)
    s4, t4 = _attention(gen, 2, 2, 3, 3), _attention(gen, 2, 2, 3, 3)
    s3, t3 = _attention(gen, 2, 3, 3), _attention(gen, 2, 3, 3)
    mask = random_mask(gen, 2, 3)
    calls = [(s4, t4), (s4, t4, mask), (s3, t3), (s3, t3, mask)]
    for call in calls:
        assert count_graph_breaks(loss, *call) == 0
    compiled, eager = compiled_and_eager(loss, calls)
    assert_all_close(compiled, eager, atol=1e-6)


# ---------------------------------------------------------------- purity and gradients
@pytest.mark.parametrize("loss", [a for a, _ in ALL], ids=IDS)
def test_inputs_untouched(loss):
    gen = generator(12)
    s, t = _attention(gen, 2, 2, 3, 3), _attention(gen, 2, 2, 3, 3)
    s[..., -1] = -10000.0
    mask = random_mask(gen, 2, 3)
    call_and_check_untouched(loss, s, t)
    call_and_check_untouched(loss, s, t, mask)


@pytest.mark.parametrize("loss", [a for a, _ in ALL], ids=IDS)
def test_gradients_with_masked_rows_and_all_masked(loss):
    gen = generator(13)
    s, t = _attention(gen, 2, 2, 3, 3), _attention(gen, 2, 2, 3, 3)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])  # batch item 1 wholly masked
    value, (grad,) = student_grads(lambda x: loss(x, t, mask), s, [])
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert grad[0].abs().sum() > 0
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))  # masked item: no gradient
    assert torch.equal(grad[0, :, 2], torch.zeros_like(grad[0, :, 2]))  # masked query row

    value, (grad,) = student_grads(lambda x: loss(x, t, torch.zeros(2, 3)), s, [])
    assert value.item() == 0
    assert torch.equal(grad, torch.zeros_like(grad))


# ---------------------------------------------------------------- properties
@given(seed=st.integers(0, 2**31 - 1), length=st.integers(1, 4), heads=st.integers(1, 3),
       masked=st.booleans(), padded=st.booleans())
def test_mse_losses_are_zero_for_identical_attention(seed, length, heads, masked, padded):
    gen = generator(seed)
    att = _attention(gen, 2, heads, length, length)
    if padded:
        att[..., -1] = -10000.0
    mask = random_mask(gen, 2, length) if masked else None
    assert attention_mse(att, att.clone(), mask).item() == 0
    assert attention_mse_sum(att, att.clone(), mask).item() == 0
    assert attention_mse_sum(att[:, 0], att[:, 0].clone(), mask).item() == 0
