"""The sampled-token reverse KL: hand-computed value and gradient (with gamma, with an importance
ratio), its expected gradient equal to the exact gradient of KL(p_S || p_T) over every sequence
of a tiny autoregressive model (gamma = 1), the discounted suffix sum, all-masked, compiled,
bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

from purekd import losses
from purekd.losses import discounted_suffix_sum, sampled_reverse_kl
from tests.conftest import count_graph_breaks, generator


def _hand_reference(lp_S, lp_T, lq, mask, gamma):
    """Value and d value / d lp_S by hand, with Python loops over each sequence (float64)."""
    batch, length = lp_S.shape
    count = sum(int(mask[b, t]) for b in range(batch) for t in range(length))
    value = 0.0
    grad = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        for t in range(length):
            if not mask[b, t]:
                continue
            advantage = -sum(gamma ** (u - t) * (float(lp_S[b, u]) - float(lp_T[b, u]))
                             for u in range(t, length) if mask[b, u])
            ratio = 1.0 if lq is None else float(torch.exp(lp_S[b, t] - lq[b, t]))
            value += -ratio * advantage / count
            grad[b, t] = -ratio * advantage / count  # d(r A)/d lp_S = r A: A is detached
    return value, grad


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("with_sampler", [False, True])
def test_value_and_gradient_equal_the_hand_computed_reference(gamma, with_sampler):
    gen = generator(0)
    lp_S = (-torch.rand(3, 5, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    lp_T = -torch.rand(3, 5, generator=gen, dtype=torch.float64) * 3
    lq = -torch.rand(3, 5, generator=gen, dtype=torch.float64) * 3 if with_sampler else None
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]])
    value = sampled_reverse_kl(lp_S, lp_T, mask=mask, sampler_logprobs=lq, gamma=gamma)
    value.backward()
    expected, expected_grad = _hand_reference(lp_S.detach(), lp_T, lq, mask, gamma)
    assert value.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(lp_S.grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_gamma_zero_on_policy_is_the_mean_sampled_log_ratio():
    lp_S = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    lp_T = torch.tensor([[-1.5, -1.0, -3.0]], dtype=torch.float64)
    value = sampled_reverse_kl(lp_S, lp_T, mask=torch.tensor([[1, 1, 0]]))
    # ((-1 + 1.5) + (-2 + 1)) / 2 = -0.25; gradient: each token's own log-ratio / 2
    assert value.item() == pytest.approx(-0.25)
    value.backward()
    torch.testing.assert_close(lp_S.grad, torch.tensor([[0.25, -0.5, 0.0]], dtype=torch.float64))


def test_advantage_is_detached_no_gradient_reaches_the_teacher():
    lp_S = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    lp_T = torch.tensor([[-1.5, -1.0]], requires_grad=True)
    sampled_reverse_kl(lp_S, lp_T, gamma=1.0).backward()
    assert lp_T.grad is None
    # d/dlp_S_t = -A_t / 2: A_0 = -((-1 + 1.5) + (-2 + 1)) = 0.5, A_1 = -(-2 + 1) = 1
    torch.testing.assert_close(lp_S.grad, torch.tensor([[-0.25, -0.5]]))


def test_expected_gradient_with_gamma_one_is_the_gradient_of_the_sequence_kl():
    """Enumerate every sequence of a 2-token, 3-symbol autoregressive model: the expectation of
    the estimator's gradient under p_S equals d KL(p_S || p_T) / d theta (per token: / 2)."""
    gen = generator(1)
    vocab = 3
    first_S = torch.randn(vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    second_S = torch.randn(vocab, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    first_T = torch.randn(vocab, generator=gen, dtype=torch.float64)
    second_T = torch.randn(vocab, vocab, generator=gen, dtype=torch.float64)

    def logprob(first, second, x):
        return torch.stack([first.log_softmax(-1)[x[0]], second[x[0]].log_softmax(-1)[x[1]]])

    sequences = list(itertools.product(range(vocab), repeat=2))
    kl = sum(logprob(first_S, second_S, x).sum().exp()
             * (logprob(first_S, second_S, x).sum() - logprob(first_T, second_T, x).sum())
             for x in sequences)
    exact = torch.autograd.grad(kl, (first_S, second_S))
    estimate = 0
    for x in sequences:
        lp_S = logprob(first_S, second_S, x).unsqueeze(0)
        probability = lp_S.sum().exp().detach()
        loss = sampled_reverse_kl(lp_S, logprob(first_T, second_T, x).unsqueeze(0).detach(),
                                  gamma=1.0)
        estimate = estimate + probability * loss
    expected = torch.autograd.grad(estimate, (first_S, second_S))
    for got, want in zip(expected, exact, strict=True):
        torch.testing.assert_close(got, want / 2, rtol=1e-10, atol=1e-12)


def test_discounted_suffix_sum_equals_the_loop():
    values = torch.randn(2, 6, generator=generator(2), dtype=torch.float64)
    for gamma in (0.0, 0.3, 1.0):
        expected = torch.zeros_like(values)
        for t in range(6):
            expected[:, t] = sum(gamma ** (u - t) * values[:, u] for u in range(t, 6))
        torch.testing.assert_close(discounted_suffix_sum(values, gamma), expected)


def test_every_token_masked_gives_zero_with_finite_gradients():
    lp_S = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    lq = torch.tensor([[float("-inf"), -2.0]])
    value = sampled_reverse_kl(lp_S, torch.zeros(1, 2), mask=torch.zeros(1, 2),
                               sampler_logprobs=lq, gamma=0.5)
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(lp_S.grad).all() and (lp_S.grad == 0).all()


def test_sum_reduction_is_the_mean_times_the_count():
    gen = generator(3)
    lp_S, lp_T = -torch.rand(2, 4, generator=gen), -torch.rand(2, 4, generator=gen)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    mean = sampled_reverse_kl(lp_S, lp_T, mask=mask, gamma=0.7)
    total = sampled_reverse_kl(lp_S, lp_T, mask=mask, gamma=0.7, reduction="sum")
    torch.testing.assert_close(total, mean * 5)


def test_compiles_without_graph_break_and_equals_eager():
    gen = generator(4)
    lp_S, lp_T, lq = (-torch.rand(2, 5, generator=gen) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])

    def loss(a, b, c, m):
        return sampled_reverse_kl(a, b, mask=m, sampler_logprobs=c, gamma=0.9)

    assert count_graph_breaks(loss, lp_S, lp_T, lq, mask) == 0
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(lp_S, lp_T, lq, mask), loss(lp_S, lp_T, lq, mask))


def test_bad_input():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"sampled_reverse_kl: gamma=1\.5 must be a number in "
                                         r"\[0, 1\]"):
        sampled_reverse_kl(lp, lp, gamma=1.5)
    with pytest.raises(ValueError, match=r"logprobs_S \(2, 3\) and logprobs_T \(3,\) must both"):
        sampled_reverse_kl(lp, torch.zeros(3))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 2\) must have the rows' shape"):
        sampled_reverse_kl(lp, lp, mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"sampler_logprobs of shape \(1, 3\) must have"):
        sampled_reverse_kl(lp, lp, sampler_logprobs=torch.zeros(1, 3))
    assert losses.sampled_reverse_kl is sampled_reverse_kl
