"""Issue 18, the losses' part: values that used to go through silently now raise or propagate.

* a NaN or ±inf teacher logit: value and gradient agree on non-finiteness (both NaN), in the
  dense, chunked and fused forms and for the top-k losses (item 1);
* a NaN or infinite temperature, a number or a tensor, raises (item 2);
* top-k inputs: duplicate ids in a row, log-probabilities whose probabilities sum past 1,
  +inf or positive log-probabilities raise (item 3);
* a negative mask value raises (item 4);
* 1-d logits ``(B,)`` raise instead of a softmax over the batch (item 10).
"""

from __future__ import annotations

import math

import pytest
import torch

from purekd import losses
from purekd.losses import _blockwise
from purekd.losses._family import divergence_loss
from purekd.losses._topk import topk_loss

N, H, V, K = 12, 5, 9, 3
NAMES = ["forward_kl", "reverse_kl", "jsd", "scaled_jsd", "skew_forward_kl", "skew_reverse_kl",
         "tvd"]


@pytest.fixture(autouse=True)
def _eager_blocks(monkeypatch):
    monkeypatch.setattr(_blockwise, "COMPILE_BLOCKS", False)


def _data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen),
            torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen))


def _value_and_grad(fn, leaf):
    leaf = leaf.detach().clone().requires_grad_(True)
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value, grad


def _agree(value, grad, row: int):
    """Both non-finite (NaN), and only the bad row's gradient is touched."""
    assert torch.isnan(value), value
    assert torch.isnan(grad[row]).all(), grad[row]
    others = torch.cat([grad[:row], grad[row + 1:]])
    assert torch.isfinite(others).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("form", ["dense", "chunked"])
@pytest.mark.parametrize("name", NAMES)
def test_a_non_finite_teacher_logit_gives_a_nan_value_and_a_nan_gradient(name, form, bad):
    h_S, w_S, h_T, w_T = _data()
    logits_T = h_T @ w_T.T
    logits_T[4] = bad if bad != -math.inf else logits_T[4]
    if bad == -math.inf:  # a whole row at -inf: no distribution at all
        logits_T[4] = -math.inf
    value, grad = _value_and_grad(lambda s: divergence_loss(
        name, s, logits_T, chunk_rows=5 if form == "chunked" else None), h_S @ w_S.T)
    _agree(value, grad, 4)


@pytest.mark.parametrize("name", NAMES)
def test_one_minus_inf_teacher_logit_is_probability_zero_not_an_error(name):
    h_S, w_S, h_T, w_T = _data()
    logits_T = h_T @ w_T.T
    logits_T[4, 2] = -math.inf  # e.g. a token the teacher's sampler forbids
    for chunk in (None, 5):
        value, grad = _value_and_grad(lambda s, c=chunk: divergence_loss(
            name, s, logits_T, chunk_rows=c), h_S @ w_S.T)
        if name == "reverse_kl":  # KL(p_S || p_T) with p_T = 0 where p_S > 0 is infinite
            assert torch.isposinf(value) and not torch.isfinite(grad[4]).all()
            continue
        assert torch.isfinite(value) and torch.isfinite(grad).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd"])
def test_the_fused_form_agrees_too(name, bad):
    h_S, w_S, h_T, w_T = _data(1)
    h_T = h_T.clone()
    h_T[7, 0] = bad  # the teacher's hidden state: its whole logits row is non-finite
    value, grad = _value_and_grad(lambda h: losses.fused_linear_kd(
        h, w_S, h_T, w_T, loss=name, chunk_rows=5), h_S)
    _agree(value, grad, 7)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_student_logit_gives_nan_too(bad):
    h_S, w_S, h_T, w_T = _data(2)
    logits_S = (h_S @ w_S.T).detach()
    logits_S[3, 1] = bad
    for chunk in (None, 5):
        value, grad = _value_and_grad(lambda s, c=chunk: divergence_loss(
            "tvd", s, h_T @ w_T.T, chunk_rows=c), logits_S)
        _agree(value, grad, 3)


def test_a_masked_non_finite_row_still_does_not_leak():
    h_S, w_S, h_T, w_T = _data()
    logits_T = h_T @ w_T.T
    logits_T[4] = math.nan
    mask = torch.ones(N, dtype=torch.long)
    mask[4] = 0
    for chunk in (None, 5):
        value, grad = _value_and_grad(lambda s, c=chunk: divergence_loss(
            "forward_kl", s, logits_T, mask=mask, chunk_rows=c), h_S @ w_S.T)
        assert torch.isfinite(value) and torch.isfinite(grad).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 0.0, -1.0])
def test_a_nan_or_infinite_temperature_raises(bad):
    logits_S, logits_T = torch.randn(4, V), torch.randn(4, V)
    with pytest.raises(ValueError, match="temperature"):
        losses.forward_kl(logits_S, logits_T, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        losses.forward_kl(logits_S, logits_T, temperature=torch.tensor(bad))
    per_row = torch.ones(4)
    per_row[2] = bad
    with pytest.raises(ValueError, match="temperature"):
        losses.tvd(logits_S, logits_T, temperature=per_row)
    ids = torch.randint(0, V, (4, K))
    with pytest.raises(ValueError, match="temperature"):
        losses.topk_kl(logits_S, ids, torch.full((4, K), -2.0), temperature=bad)


def _topk(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits_S = torch.randn(N, V, generator=gen)
    logprobs, ids = torch.randn(N, V, generator=gen).log_softmax(-1).topk(K, dim=-1)
    return logits_S, ids, logprobs


@pytest.mark.parametrize("name", ["topk_kl", "topk_reverse_kl", "topk_jsd"])
def test_topk_inputs_that_are_no_distribution_raise(name):
    logits_S, ids, logprobs = _topk()
    duplicate = ids.clone()
    duplicate[5, 2] = duplicate[5, 0]
    with pytest.raises(ValueError, match=r"ids_T holds an id twice in row 5"):
        topk_loss(name, logits_S, duplicate, logprobs)
    too_much = logprobs.clone()
    too_much[2] = math.log(1.0)  # three entries of probability 1: they sum to 3
    with pytest.raises(ValueError, match=r"logprobs_T.*row 2.*sum to 3"):
        topk_loss(name, logits_S, ids, too_much)
    for bad in (math.inf, 0.5, math.nan):
        wrong = logprobs.clone()
        wrong[8, 1] = bad
        with pytest.raises(ValueError, match=r"logprobs_T.*row 8"):
            topk_loss(name, logits_S, ids, wrong)
    # a masked row is not looked at (a cache row the batch does not use)
    mask = torch.ones(N, dtype=torch.long)
    mask[5] = 0
    assert torch.isfinite(topk_loss(name, logits_S, duplicate, logprobs, mask=mask))
    # -inf (probability 0) and sums of 1 up to rounding are fine
    edge = logprobs.clone()
    edge[0, 2] = -math.inf
    full_logprobs, full_ids = torch.randn(N, V).log_softmax(-1).topk(V, dim=-1)
    at_zero = topk_loss(name, logits_S, ids, edge)
    # reverse KL where the teacher's probability is 0 and the student's is not: +inf, rightly
    assert torch.isposinf(at_zero) if name == "topk_reverse_kl" else torch.isfinite(at_zero)
    assert torch.isfinite(topk_loss(name, logits_S, full_ids, full_logprobs))


def test_the_fused_topk_form_checks_them_too():
    h_S, w_S, _, _ = _data()
    _, ids, logprobs = _topk()
    duplicate = ids.clone()
    duplicate[1, 1] = duplicate[1, 0]
    with pytest.raises(ValueError, match="twice"):
        losses.fused_linear_topk_kl(h_S, w_S, duplicate, logprobs)


@pytest.mark.parametrize("call", ["dense", "topk", "fused", "kd_ce", "kd_mse"])
def test_a_negative_mask_value_raises(call):
    h_S, w_S, h_T, w_T = _data()
    logits_S, logits_T = h_S @ w_S.T, h_T @ w_T.T
    _, ids, logprobs = _topk()
    mask = torch.ones(N)
    mask[3] = -1
    with pytest.raises(ValueError, match=r"mask.*negative.*-1"):
        if call == "dense":
            losses.forward_kl(logits_S, logits_T, mask=mask)
        elif call == "topk":
            losses.topk_kl(logits_S, ids, logprobs, mask=mask)
        elif call == "fused":
            losses.fused_linear_kd(h_S, w_S, h_T, w_T, mask=mask)
        elif call == "kd_ce":
            losses.kd_ce(logits_S, logits_T, mask=mask)
        else:
            losses.kd_mse(logits_S, logits_T, mask=mask)


@pytest.mark.parametrize("fn", [losses.forward_kl, losses.tvd, losses.kd_ce])
def test_one_dimensional_logits_raise(fn):
    with pytest.raises(ValueError, match=r"1-d logits_S \(8,\).*\(rows, classes\)"):
        fn(torch.randn(8), torch.randn(8))
