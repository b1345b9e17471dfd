"""kd_ce_chunked: kd_ce's value and gradients, computed in row blocks."""

from __future__ import annotations

import pytest
import torch

from purekd.losses import _logits, kd_ce, kd_ce_chunked


def _inputs(seed: int, shape: tuple[int, ...] = (3, 5, 7)):
    gen = torch.Generator().manual_seed(seed)
    logits_S = torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)
    logits_T = (3 * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_(True)
    mask = (torch.rand(*shape[:-1], generator=gen) > 0.3).long()
    mask.view(-1)[0] = 1
    tau = torch.rand(*shape[:-1], generator=gen, dtype=torch.float64) + 1
    return logits_S, logits_T, mask, tau


@pytest.mark.parametrize("compile_blocks", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 4, 15, 64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("per_row_temperature", [False, True])
def test_equals_kd_ce_value_and_both_gradients(compile_blocks, chunk_rows, masked,
                                                per_row_temperature):
    logits_S, logits_T, mask, tau = _inputs(0)
    temperature = tau if per_row_temperature else 2.5
    mask_arg = mask if masked else None
    want = kd_ce(logits_S, logits_T, temperature, mask_arg)
    got = kd_ce_chunked(logits_S, logits_T, temperature, mask_arg, chunk_rows=chunk_rows,
                        compile_blocks=compile_blocks)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for g_got, g_want in zip(torch.autograd.grad(got, (logits_S, logits_T)),
                             torch.autograd.grad(want, (logits_S, logits_T)), strict=True):
        torch.testing.assert_close(g_got, g_want, atol=1e-10, rtol=1e-10)


def test_two_dimensional_logits_and_hand_computed_value():
    logits_S = torch.tensor([[0.0, 0.0]], requires_grad=True)
    logits_T = torch.tensor([[0.0, 2.0]])
    # temperature 2: p_T = softmax([0, 1]); student uniform: loss = log 2 (whatever p_T is)
    value = kd_ce_chunked(logits_S, logits_T, 2.0)
    torch.testing.assert_close(value, torch.tensor(2.0).log())
    (grad,) = torch.autograd.grad(value, logits_S)
    p_T = torch.softmax(torch.tensor([0.0, 1.0]), dim=0)
    torch.testing.assert_close(grad[0], (torch.tensor([0.5, 0.5]) - p_T) / 2)


def test_masked_rows_with_non_finite_values_take_no_part():
    logits_S, logits_T, mask, _ = _inputs(1)
    clean = kd_ce_chunked(logits_S, logits_T, 2.0, mask, chunk_rows=4)
    poisoned_S = logits_S.detach().clone()
    poisoned_S[mask == 0] = float("inf")
    poisoned_S.requires_grad_(True)
    value = kd_ce_chunked(poisoned_S, logits_T.detach(), 2.0, mask, chunk_rows=4)
    torch.testing.assert_close(value, clean)
    (grad,) = torch.autograd.grad(value, poisoned_S)
    assert torch.isfinite(grad).all()
    assert (grad[mask == 0] == 0).all()


def test_all_masked_is_zero_with_zero_gradient():
    logits_S, logits_T, mask, _ = _inputs(2)
    value = kd_ce_chunked(logits_S, logits_T, 2.0, torch.zeros_like(mask))
    assert value.item() == 0.0
    (grad,) = torch.autograd.grad(value, logits_S)
    assert (grad == 0).all()


def test_inputs_untouched_and_shape_errors():
    logits_S, logits_T, mask, _ = _inputs(3)
    before = (logits_S.detach().clone(), logits_T.detach().clone(), mask.clone())
    kd_ce_chunked(logits_S, logits_T, 2.0, mask, chunk_rows=2).backward()
    for a, b in zip(before, (logits_S, logits_T, mask), strict=True):
        assert torch.equal(a, b.detach())
    with pytest.raises(ValueError, match=r"\(3, 5, 7\).*\(3, 5, 6\)"):
        kd_ce_chunked(logits_S, logits_T[..., :6], 2.0)
    with pytest.raises(ValueError, match="chunk_rows"):
        kd_ce_chunked(logits_S, logits_T, 2.0, chunk_rows=0)


def test_kd_ce_switches_to_chunks_for_large_inputs(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return kd_ce_chunked(*args, **kwargs)

    monkeypatch.setattr(_logits, "kd_ce_chunked", spy)
    monkeypatch.setattr(_logits, "CHUNKED_KD_MIN_ELEMENTS", 100)
    logits_S, logits_T, mask, _ = _inputs(4)
    kd_ce(logits_S[:1, :1], logits_T[:1, :1], 2.0)  # 7 logits: plain formula
    assert calls == []
    kd_ce(logits_S, logits_T, 2.0, mask)  # 105 logits: chunked
    assert calls == [logits_S.shape]


def test_no_graph_break_inside_an_outer_compile():
    logits_S, logits_T, mask, _ = _inputs(5)
    explanation = torch._dynamo.explain(
        lambda s, t, m: kd_ce_chunked(s, t, 2.0, m, chunk_rows=4))(logits_S, logits_T, mask)
    assert explanation.graph_break_count == 0
