"""Top-k losses: references from the definitions (partial support), hand-computed cases,
k = V equals the dense loss for every mode, masks, chunks, compilation, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from purekd.losses import (
    _blockwise,
    forward_kl,
    jsd,
    reverse_kl,
    topk_jsd,
    topk_kl,
    topk_reverse_kl,
)
from purekd.losses._topk import topk_loss
from tests.conftest import call_and_check_untouched, count_graph_breaks, generator

MODES = [("topk_kl", False, {}), ("topk_kl", True, {}), ("topk_reverse_kl", False, {}),
         ("topk_reverse_kl", True, {}), ("topk_jsd", False, {"beta": 0.3}),
         ("topk_jsd", True, {"beta": 0.7}), ("topk_jsd", False, {"beta": 0.0}),
         ("topk_jsd", True, {"beta": 1.0})]
MODE_IDS = [f"{n}-tail{t}{list(p.values())}" for n, t, p in MODES]


@pytest.fixture(autouse=True)
def _eager_blocks(monkeypatch):
    """Block kernels run eagerly here (same code); compilation is tested once, in test_fused."""
    monkeypatch.setattr(_blockwise, "COMPILE_BLOCKS", False)


def _kl(p, q):
    return torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(-1)


def _gen_jsd(p, q, beta):  # p student, q teacher
    if beta == 0:
        return _kl(q, p)
    if beta == 1:
        return _kl(p, q)
    m = beta * q + (1 - beta) * p
    return beta * _kl(q, m) + (1 - beta) * _kl(p, m)


def reference(name, tail, logits_S, ids, logprobs, temperature, mask, reduction, beta=0.5):
    """The modes' definitions in float64, masked rows removed by selection."""
    p = torch.softmax(logits_S.double() / temperature, -1)
    q = logprobs.double().exp()
    p_k = p.gather(-1, ids)
    if tail:
        b_S = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
        b_T = torch.cat([q, (1 - q.sum(-1, keepdim=True)).clamp_min(0)], -1)
    else:
        b_T = q ** (1 / temperature)
        b_T = b_T / b_T.sum(-1, keepdim=True)
        b_S = p_k if name == "topk_kl" else p_k / p_k.sum(-1, keepdim=True)
    if name == "topk_kl":
        per_row = (b_T * (b_T.log() - b_S.log())).sum(-1)
    elif name == "topk_reverse_kl":
        per_row = _kl(b_S, b_T)
    else:
        per_row = _gen_jsd(b_S, b_T, beta)
    if mask is not None:
        per_row = per_row[mask.bool()]
    return per_row.sum() if reduction == "sum" else per_row.sum() / max(per_row.numel(), 1)


def _inputs(seed, rows=(3, 4), vocab=13, k=5, dtype=torch.float64):
    gen = generator(seed)
    logits_S = torch.randn(*rows, vocab, generator=gen, dtype=dtype)
    teacher = torch.log_softmax(2 * torch.randn(*rows, vocab, generator=gen, dtype=dtype), -1)
    logprobs, ids = teacher.topk(k, dim=-1)
    mask = (torch.rand(*rows, generator=gen) > 0.3).long()
    mask.view(-1)[0] = 1
    return logits_S, ids, logprobs, mask, teacher


def _value_and_grad(fn, logits_S):
    s = logits_S.detach().clone().requires_grad_(True)
    value = fn(s)
    return value, torch.autograd.grad(value, s)[0]


@pytest.mark.parametrize("chunk_rows", [12, 5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("name", "tail", "params"), MODES, ids=MODE_IDS)
def test_partial_support_equals_the_definition(name, tail, params, masked, reduction,
                                               chunk_rows):
    logits_S, ids, logprobs, mask, _ = _inputs(0)
    mask_arg = mask if masked else None
    tau = 1.0 if tail else 1.7
    want = _value_and_grad(lambda s: reference(name, tail, s, ids, logprobs, tau, mask_arg,
                                               reduction, **params), logits_S)
    got = _value_and_grad(lambda s: topk_loss(name, s, ids, logprobs, tail=tail,
                                              temperature=tau, mask=mask_arg,
                                              reduction=reduction, chunk_rows=chunk_rows,
                                              compile_blocks=False, **params), logits_S)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


def test_hand_computed_partial_support():
    # student uniform over 3 tokens; the teacher's top-1 is token 0 with probability 1/2
    logits_S = torch.zeros(1, 3, dtype=torch.float64)
    ids = torch.tensor([[0]])
    logprobs = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    # support: the renormalised teacher [1] against log(1/3)
    assert topk_kl(logits_S, ids, logprobs).item() == pytest.approx(math.log(3))
    # tail buckets: teacher [1/2, 1/2], student [1/3, 2/3]
    assert topk_kl(logits_S, ids, logprobs, tail=True).item() == pytest.approx(
        0.5 * math.log(1.5) + 0.5 * math.log(0.75))
    assert topk_reverse_kl(logits_S, ids, logprobs, tail=True).item() == pytest.approx(
        math.log(2 / 3) / 3 + 2 / 3 * math.log(4 / 3))
    # both renormalised to [1] on a one-entry support: nothing to learn
    assert topk_reverse_kl(logits_S, ids, logprobs).item() == pytest.approx(0.0)
    assert topk_jsd(logits_S, ids, logprobs).item() == pytest.approx(0.0)
    # jsd(beta=1/2) on buckets: m = [5/12, 7/12]
    m = [5 / 12, 7 / 12]
    want = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        math.log((1 / 3) / m[0]) / 3 + 2 / 3 * math.log((2 / 3) / m[1]))
    assert topk_jsd(logits_S, ids, logprobs, tail=True).item() == pytest.approx(want)


DENSE = {"topk_kl": forward_kl, "topk_reverse_kl": reverse_kl, "topk_jsd": jsd}


@pytest.mark.parametrize(("name", "tail", "params"), MODES, ids=MODE_IDS)
def test_k_equal_to_the_vocabulary_is_the_dense_loss(name, tail, params):
    logits_S, _, _, mask, teacher = _inputs(1)
    gen = generator(2)
    ids = torch.argsort(torch.rand(*teacher.shape, generator=gen), -1)  # every id, any order
    logprobs = teacher.gather(-1, ids)
    for tau in (1.0,) if tail else (1.0, 0.6, 2.5):
        for chunk_rows in (12, 5):
            got = _value_and_grad(lambda s, t=tau, c=chunk_rows: topk_loss(
                name, s, ids, logprobs, tail=tail, temperature=t, mask=mask, chunk_rows=c,
                compile_blocks=False, **params), logits_S)
            want = _value_and_grad(lambda s, t=tau: DENSE[name](
                s, teacher, temperature=t, mask=mask, **params), logits_S)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8)


@given(seed=st.integers(0, 10_000), k=st.integers(1, 13), chunk_rows=st.integers(1, 13))
def test_chunk_size_changes_nothing(seed, k, chunk_rows):
    logits_S, ids, logprobs, mask, _ = _inputs(seed, k=k)
    for name, tail, params in MODES[:4]:
        one = _value_and_grad(lambda s, n=name, t=tail, p=params: topk_loss(
            n, s, ids, logprobs, tail=t, mask=mask, compile_blocks=False, **p), logits_S)
        many = _value_and_grad(lambda s, n=name, t=tail, p=params: topk_loss(
            n, s, ids, logprobs, tail=t, mask=mask, chunk_rows=chunk_rows,
            compile_blocks=False, **p), logits_S)
        for a, b in zip(one, many, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
        assert one[0].item() >= -1e-12


@pytest.mark.parametrize(("name", "tail", "params"), MODES[:6], ids=MODE_IDS[:6])
def test_all_masked_and_garbage_in_masked_rows(name, tail, params):
    logits_S, ids, logprobs, mask, _ = _inputs(3)
    value, grad = _value_and_grad(lambda s: topk_loss(name, s, ids, logprobs, tail=tail,
                                                      mask=torch.zeros_like(mask), **params),
                                  logits_S)
    assert value.item() == 0.0 and (grad == 0).all()
    bad_ids, bad_logprobs, bad_S = ids.clone(), logprobs.clone(), logits_S.clone()
    bad_ids[mask == 0] = -1  # rows past a sample's length: anything
    bad_logprobs[mask == 0] = float("nan")
    bad_S[mask == 0] = float("inf")
    clean = _value_and_grad(lambda s: topk_loss(name, s, ids, logprobs, tail=tail, mask=mask,
                                                compile_blocks=False, **params), logits_S)
    dirty = _value_and_grad(lambda s: topk_loss(name, s, bad_ids, bad_logprobs, tail=tail,
                                                mask=mask, compile_blocks=False, **params),
                            bad_S)
    for c, d in zip(clean, dirty, strict=True):
        torch.testing.assert_close(d, c)


def test_float16_cache_and_bfloat16_logits():
    logits_S, ids, logprobs, mask, _ = _inputs(4, dtype=torch.float32)
    low = logits_S.bfloat16().requires_grad_(True)
    value = topk_kl(low, ids.to(torch.int32), logprobs.half(), mask=mask, temperature=2.0)
    narrow = topk_kl(low.detach(), ids.to(torch.uint16), logprobs.half(), mask=mask,
                     temperature=2.0)  # a cache's narrowest id type
    torch.testing.assert_close(narrow, value.detach())
    value.backward()
    assert value.dtype == torch.float32 and low.grad is not None and low.grad.dtype == torch.bfloat16
    want = reference("topk_kl", False, low.detach().double(), ids, logprobs.half().double(), 2.0,
                     mask, "mean")
    torch.testing.assert_close(value.double(), want, atol=1e-5, rtol=1e-5)


def test_inputs_untouched_no_graph_break_and_compiled_kernels_equal_eager():
    logits_S, ids, logprobs, mask, _ = _inputs(5, dtype=torch.float32)
    for name, tail, params in MODES[:6]:
        call_and_check_untouched(lambda s, i, lp, m, n=name, t=tail, p=params: topk_loss(
            n, s, i, lp, tail=t, mask=m, compile_blocks=False, **p), logits_S, ids, logprobs,
            mask)
    assert count_graph_breaks(lambda s, i, lp, m: topk_kl(s, i, lp, mask=m, temperature=2.0),
                              logits_S, ids, logprobs, mask) == 0
    assert count_graph_breaks(lambda s, i, lp, m: topk_jsd(s, i, lp, mask=m, tail=True),
                              logits_S, ids, logprobs, mask) == 0


def test_bad_input_raises_naming_the_argument():
    logits_S, ids, logprobs, mask, _ = _inputs(6)
    outside = ids.clone()
    outside[0, 0, 0] = 13
    with pytest.raises(ValueError, match=r"ids_T.*outside.*\[0, 13\).*13"):
        topk_kl(logits_S, outside, logprobs)
    outside[0, 0, 0] = -2
    with pytest.raises(ValueError, match=r"ids_T.*outside"):
        topk_reverse_kl(logits_S, outside, logprobs)
    with pytest.raises(ValueError, match="tail=True needs temperature=1"):
        topk_kl(logits_S, ids, logprobs, tail=True, temperature=2.0)
    with pytest.raises(ValueError, match=r"same shape"):
        topk_kl(logits_S, ids, logprobs[..., :4])
    with pytest.raises(ValueError, match=r"rows"):
        topk_kl(logits_S, ids[:, :3], logprobs[:, :3])
    with pytest.raises(TypeError, match="integer"):
        topk_kl(logits_S, ids.double(), logprobs)
    with pytest.raises(ValueError, match=r"mask of shape"):
        topk_kl(logits_S, ids, logprobs, mask=mask[:, :2])
    with pytest.raises(ValueError, match="beta=2"):
        topk_jsd(logits_S, ids, logprobs, beta=2)
    with pytest.raises(ValueError, match="temperature"):
        topk_kl(logits_S, ids, logprobs, temperature=0.0)
