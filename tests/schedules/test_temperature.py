"""Temperature schedules: constant, flsw, cwsm, against TextBrewer's builders."""

from __future__ import annotations

import pytest
import torch
from textbrewer import schedulers as tb

from purekd.schedules import constant_temperature, cwsm, flsw
from tests.conftest import call_and_check_untouched, generator, randn, random_mask

SHAPES = [(4, 5), (3, 4, 6)]
SHAPE_IDS = ["2d", "3d"]


def _logits(seed, shape):
    gen = generator(seed)
    return randn(gen, *shape) * 3, randn(gen, *shape) * 3


def _schedules():
    """(purekd schedule, TextBrewer schedule) pairs over a few hyper-parameters."""
    pairs = []
    for beta, gamma in [(1.0, 2.0), (0.5, 1.0), (2.0, 0.5)]:
        pairs.append((flsw(beta, gamma), tb.flsw_temperature_scheduler_builder(beta, gamma)))
    for beta in (1.0, 0.3):
        pairs.append((cwsm(beta), tb.cwsm_temperature_scheduler_builder(beta)))
    return pairs


SCHEDULES = _schedules()
SCHEDULE_IDS = ["flsw(1,2)", "flsw(.5,1)", "flsw(2,.5)", "cwsm(1)", "cwsm(.3)"]


def test_constant_returns_the_base_temperature():
    logits_S, logits_T = _logits(0, (3, 4))
    for base in (1.0, 4, 2.5):
        out = constant_temperature(logits_S, logits_T, base)
        assert out == base and type(out) is type(base)
        assert out == tb.constant_temperature_scheduler(logits_S, logits_T, base)
        assert constant_temperature(logits_S, logits_T, base, torch.ones(3)) == base


@pytest.mark.parametrize(("schedule", "tb_schedule"), SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("seed", range(3))
def test_matches_textbrewer(schedule, tb_schedule, shape, seed):
    logits_S, logits_T = _logits(seed, shape)
    for base in (1.0, 4.0):
        tau = schedule(logits_S, logits_T, base)
        assert tau.shape == shape[:-1]
        torch.testing.assert_close(tau, tb_schedule(logits_S, logits_T, base), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("schedule", "tb_schedule"), SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("seed", range(3))
def test_masked_matches_textbrewer_on_selected_rows(schedule, tb_schedule, seed):
    logits_S, logits_T = _logits(seed, (3, 5, 4))
    mask = random_mask(generator(seed + 100), 3, 5, dtype=[torch.long, torch.bool][seed % 2])
    rows = mask.bool()
    tau = schedule(logits_S, logits_T, 4.0, mask)
    assert tau.shape == (3, 5)
    expected = tb_schedule(logits_S[rows], logits_T[rows], 4.0)
    torch.testing.assert_close(tau[rows], expected, atol=1e-6, rtol=0)
    # the mask changes the batch statistics (the mean over rows), so it is not a no-op
    assert not torch.allclose(tau[rows], schedule(logits_S, logits_T, 4.0)[rows], atol=1e-6)


def test_flsw_and_cwsm_hand_computed():
    # flsw: row 0 aligned (cos 1 -> w = 0), row 1 orthogonal (cos 0 -> w = 1); mean w = 1/2
    logits_S = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits_T = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    tau = flsw(beta=2.0, gamma=1.0)(logits_S, logits_T, 4.0)
    # eps = 1e-4 in the normalisation: cos of the aligned row is (1/(1+1e-4))^2
    w0 = 1 - (1 / (1 + 1e-4)) ** 2
    mean_w = (w0 + 1) / 2
    torch.testing.assert_close(tau, torch.tensor([4 + 2 * (mean_w - w0), 4 + 2 * (mean_w - 1)]))
    # cwsm: softmax max of [0, 0] is 1/2, of [ln 3, 0] is 3/4
    logits_S = torch.tensor([[0.0, 0.0], [torch.log(torch.tensor(3.0)).item(), 0.0]])
    w = torch.tensor([1 / (0.5 + 1e-3), 1 / (0.75 + 1e-3)])
    tau = cwsm(beta=1.0)(logits_S, logits_T, 4.0)
    torch.testing.assert_close(tau, 4 + (w.mean() - w))


@pytest.mark.parametrize(("schedule", "tb_schedule"), SCHEDULES, ids=SCHEDULE_IDS)
def test_temperatures_carry_no_gradient_and_inputs_untouched(schedule, tb_schedule):
    logits_S, logits_T = _logits(7, (3, 4, 5))
    logits_S.requires_grad_(True)
    logits_T.requires_grad_(True)
    mask = random_mask(generator(8), 3, 4)
    for args in ((logits_S, logits_T, 2.0), (logits_S, logits_T, 2.0, mask)):
        tau = call_and_check_untouched(schedule, *args)
        assert not tau.requires_grad
        assert tau.grad_fn is None
    # a loss using the temperature still back-propagates into the logits, through the logits only
    tau = schedule(logits_S, logits_T, 2.0)
    (logits_S / tau.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(logits_S.grad, (1 / tau).unsqueeze(-1).expand_as(logits_S))
    assert logits_T.grad is None


@pytest.mark.parametrize(("schedule", "tb_schedule"), [SCHEDULES[0], SCHEDULES[3]],
                         ids=["flsw", "cwsm"])
def test_non_finite_masked_rows_do_not_change_the_temperatures(schedule, tb_schedule):
    logits_S, logits_T = _logits(5, (2, 3, 4))
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    logits_S[0, 2] = float("inf")
    rows = mask.bool()
    tau = schedule(logits_S, logits_T, 4.0, mask)
    expected = tb_schedule(logits_S[rows], logits_T[rows], 4.0)
    torch.testing.assert_close(tau[rows], expected, atol=1e-6, rtol=0)
