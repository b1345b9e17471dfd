"""``token_logprobs``: the log-probability of given tokens from hidden states and the output
layer equals log_softmax of the materialised logits in value and in every gradient (bias, a
temperature, small blocks, a mask), all-masked rows, bad input."""

from __future__ import annotations

import pytest
import torch

from purekd.losses import token_logprobs
from tests.conftest import generator


def _inputs(seed: int = 0, rows: tuple[int, ...] = (3, 5), width: int = 4, vocab: int = 11):
    gen = generator(seed)
    hidden = torch.randn(*rows, width, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(vocab, rows, generator=gen)
    return hidden, weight, bias, ids


@pytest.mark.parametrize("chunk_rows", [None, 2, 7])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_log_softmax_of_the_logits_in_value_and_gradients(chunk_rows, temperature, masked):
    hidden, weight, bias, ids = _inputs()
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]) if masked else None
    upstream = torch.randn(3, 5, generator=generator(9), dtype=torch.float64)

    def reference():
        logits = (hidden @ weight.T + bias) / temperature
        chosen = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return chosen if mask is None else torch.where(mask != 0, chosen, 0.0)

    expected = reference()
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight, bias))
    got = token_logprobs(hidden, weight, ids, bias=bias, temperature=temperature, mask=mask,
                         chunk_rows=chunk_rows)
    grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight, bias))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    if mask is not None:  # masked rows: no gradient at all
        assert (grads[0][mask == 0] == 0).all()


def test_float32_inputs_give_float32_and_no_bias_works():
    hidden, weight, _, ids = _inputs(1)
    got = token_logprobs(hidden.float(), weight.float(), ids)
    assert got.dtype == torch.float32
    expected = (hidden @ weight.T).log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_every_row_masked_gives_zeros_and_finite_gradients():
    hidden, weight, bias, ids = _inputs(2)
    got = token_logprobs(hidden, weight, ids, bias=bias, mask=torch.zeros(3, 5))
    assert (got == 0).all()
    got.sum().backward()
    assert hidden.grad is not None and (hidden.grad == 0).all()


def test_bad_input():
    hidden, weight, bias, ids = _inputs(3)
    with pytest.raises(ValueError, match=r"token_logprobs: ids must be in \[0, 11\)"):
        token_logprobs(hidden, weight, ids + 11)
    with pytest.raises(ValueError, match=r"token_logprobs: ids of shape \(3,\) must have the "
                                         r"rows' shape \(3, 5\)"):
        token_logprobs(hidden, weight, ids[:, 0])
    with pytest.raises(ValueError, match=r"hidden \(3, 5, 4\) and weight \(11, 3\) must be"):
        token_logprobs(hidden, weight[:, :3], ids)
    with pytest.raises(ValueError, match=r"bias of shape \(10,\) must be \(11,\)"):
        token_logprobs(hidden, weight, ids, bias=bias[:10])
    with pytest.raises(TypeError, match="ids must be integer token ids"):
        token_logprobs(hidden, weight, ids.double())
