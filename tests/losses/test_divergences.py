"""The divergence family: float64 references from the definitions, TRL's generalized JSD as an
oracle, the chunked path, masks, reductions, dtypes, compilation and bad input."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from purekd.losses import (
    _blockwise,
    _logits,
    forward_kl,
    jsd,
    kd_ce,
    reverse_kl,
    scaled_jsd,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from purekd.losses._family import divergence_loss
from tests.conftest import call_and_check_untouched, count_graph_breaks, generator

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(autouse=True)
def _eager_blocks(monkeypatch):
    """Block kernels run eagerly here (same code); compilation is tested once, in test_fused."""
    monkeypatch.setattr(_blockwise, "COMPILE_BLOCKS", False)


# ------------------------------------------------------- references, from the definitions
def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def _ref_jsd(p_S, p_T, beta):
    if beta == 0:
        return _kl(p_T, p_S)
    if beta == 1:
        return _kl(p_S, p_T)
    m = beta * p_T + (1 - beta) * p_S
    return beta * _kl(p_T, m) + (1 - beta) * _kl(p_S, m)


def _ref_scaled_jsd(p_S, p_T, beta):
    if beta in (0, 1):
        return _ref_jsd(p_S, p_T, beta)
    return _ref_jsd(p_S, p_T, beta) / (beta * (1 - beta))


REFERENCES = {
    "forward_kl": lambda p_S, p_T: _kl(p_T, p_S),
    "reverse_kl": lambda p_S, p_T: _kl(p_S, p_T),
    "jsd": lambda p_S, p_T, beta=0.5: _ref_jsd(p_S, p_T, beta),
    "scaled_jsd": lambda p_S, p_T, beta=0.5: _ref_scaled_jsd(p_S, p_T, beta),
    "skew_forward_kl": lambda p_S, p_T, alpha=0.1: _kl(p_T, alpha * p_T + (1 - alpha) * p_S),
    "skew_reverse_kl": lambda p_S, p_T, alpha=0.1: _kl(p_S, alpha * p_S + (1 - alpha) * p_T),
    "tvd": lambda p_S, p_T: 0.5 * (p_T - p_S).abs().sum(-1),
}
PUBLIC = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd,
          "scaled_jsd": scaled_jsd, "skew_forward_kl": skew_forward_kl,
          "skew_reverse_kl": skew_reverse_kl, "tvd": tvd}
CASES = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("jsd", {"beta": 0.0}),
         ("jsd", {"beta": 1.0}), ("scaled_jsd", {"beta": 0.8}), ("skew_forward_kl", {"alpha": 0.2}),
         ("skew_reverse_kl", {"alpha": 0.3}), ("tvd", {})]
CASE_IDS = [f"{n}{list(p.values())}" for n, p in CASES]


def reference(name, logits_S, logits_T, temperature, mask, reduction, **params):
    """The definition on float64 probabilities; masked rows removed by boolean selection."""
    tau = temperature.unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature
    p_S = torch.softmax(logits_S.double() / tau, -1)
    p_T = torch.softmax(logits_T.double() / tau, -1)
    per_row = REFERENCES[name](p_S, p_T, **params)
    if mask is not None:
        per_row = per_row[mask.bool()]
    return per_row.sum() if reduction == "sum" else per_row.sum() / max(per_row.numel(), 1)


def _inputs(seed, shape=(3, 5, 11), dtype=torch.float64):
    gen = generator(seed)
    logits_S = torch.randn(*shape, generator=gen, dtype=dtype)
    logits_T = 2 * torch.randn(*shape, generator=gen, dtype=dtype)
    mask = (torch.rand(*shape[:-1], generator=gen) > 0.3).long()
    mask.view(-1)[0] = 1
    tau = torch.rand(*shape[:-1], generator=gen, dtype=dtype) + 0.7
    return logits_S, logits_T, mask, tau


def _value_and_grads(fn, logits_S, logits_T):
    s = logits_S.detach().clone().requires_grad_(True)
    t = logits_T.detach().clone().requires_grad_(True)
    value = fn(s, t)
    return (value, *torch.autograd.grad(value, (s, t)))


# ------------------------------------------------------------------------ values, gradients
@pytest.mark.parametrize("chunk_rows", [None, 4])  # None: the plain formula; 4: row blocks
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_value_and_both_gradients_equal_the_definition(name, params, masked, reduction,
                                                       chunk_rows):
    logits_S, logits_T, mask, tau = _inputs(0)
    mask_arg = mask if masked else None
    temperature = tau if masked else 2.0  # per-row and scalar temperatures
    want = _value_and_grads(lambda s, t: reference(name, s, t, temperature, mask_arg, reduction,
                                                   **params), logits_S, logits_T)
    got = _value_and_grads(lambda s, t: divergence_loss(
        name, s, t, temperature=temperature, mask=mask_arg, reduction=reduction,
        chunk_rows=chunk_rows, compile_blocks=False, **params), logits_S, logits_T)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(("name", "params"), CASES[:2] + CASES[5:], ids=CASE_IDS[:2] + CASE_IDS[5:])
def test_public_functions_are_the_named_divergences(name, params):
    logits_S, logits_T, mask, _ = _inputs(1)
    got = PUBLIC[name](logits_S, logits_T, temperature=1.5, mask=mask, **params)
    want = reference(name, logits_S, logits_T, 1.5, mask, "mean", **params)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_hand_computed_two_class_values():
    # p_S = [1/4, 3/4], p_T = [1/2, 1/2]
    logits_S = torch.tensor([[0.0, math.log(3)]], dtype=torch.float64)
    logits_T = torch.zeros(1, 2, dtype=torch.float64)
    assert forward_kl(logits_S, logits_T).item() == pytest.approx(0.5 * math.log(4 / 3))
    assert reverse_kl(logits_S, logits_T).item() == pytest.approx(
        0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert tvd(logits_S, logits_T).item() == pytest.approx(0.25)
    # m = [3/8, 5/8]
    m = [3 / 8, 5 / 8]
    want = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert jsd(logits_S, logits_T).item() == pytest.approx(want)
    assert scaled_jsd(logits_S, logits_T).item() == pytest.approx(4 * want)
    # alpha = 1/2: KL(p_T || m) with the same m
    assert skew_forward_kl(logits_S, logits_T, alpha=0.5).item() == pytest.approx(
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))


def test_forward_kl_has_kd_ce_gradient():
    logits_S, logits_T, mask, _ = _inputs(2)
    got = _value_and_grads(lambda s, t: forward_kl(s, t, temperature=2.0, mask=mask),
                           logits_S, logits_T)
    want = _value_and_grads(lambda s, t: kd_ce(s, t, 2.0, mask), logits_S, logits_T)
    torch.testing.assert_close(got[1], want[1])


# ------------------------------------------------------------------------ TRL's oracle
def _gkd_trainer():
    try:  # trl >= 1.0 keeps GKD among its experimental trainers
        from trl.experimental.gkd import GKDTrainer
    except ImportError:  # pragma: no cover - older trl
        from trl import GKDTrainer
    return GKDTrainer


@pytest.mark.parametrize("chunk_rows", [None, 3])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_equals_trl_generalized_jsd_loss(beta, chunk_rows):
    GKDTrainer = _gkd_trainer()
    logits_S, logits_T, mask, _ = _inputs(3, dtype=torch.float32)
    labels = torch.where(mask.bool(), 7, -100)
    want = _value_and_grads(lambda s, t: GKDTrainer.generalized_jsd_loss(
        s, t, labels=labels, beta=beta, temperature=2.0), logits_S, logits_T)
    got = _value_and_grads(lambda s, t: divergence_loss(
        "jsd", s, t, beta=beta, temperature=2.0, mask=mask, chunk_rows=chunk_rows,
        compile_blocks=False), logits_S, logits_T)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-5)


def test_jsd_endpoints_are_discontinuous_and_scaled_jsd_is_continuous():
    logits_S, logits_T, mask, _ = _inputs(4)
    kl_f = forward_kl(logits_S, logits_T, mask=mask)
    kl_r = reverse_kl(logits_S, logits_T, mask=mask)
    # TRL's values: near the endpoints the mixture formula vanishes, at them it is the full KL
    assert jsd(logits_S, logits_T, beta=1e-6, mask=mask) < 1e-5 * kl_f
    assert jsd(logits_S, logits_T, beta=1 - 1e-6, mask=mask) < 1e-5 * kl_r
    torch.testing.assert_close(jsd(logits_S, logits_T, beta=0.0, mask=mask), kl_f)
    # the scaled form tends to the KLs
    torch.testing.assert_close(scaled_jsd(logits_S, logits_T, beta=1e-6, mask=mask), kl_f,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scaled_jsd(logits_S, logits_T, beta=1 - 1e-6, mask=mask), kl_r,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scaled_jsd(logits_S, logits_T, mask=mask),
                               4 * jsd(logits_S, logits_T, mask=mask))


@given(beta=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_jsd_is_bounded_and_nonnegative(beta, seed):
    logits_S, logits_T, mask, _ = _inputs(seed, shape=(4, 9))
    value = jsd(logits_S, logits_T, beta=beta, mask=mask).item()
    assert value >= -1e-12
    if 0 < beta < 1:  # a mixture-based JSD is at most the entropy bound
        bound = -(beta * math.log(beta) + (1 - beta) * math.log1p(-beta))
        assert value <= bound + 1e-9
    assert 0 <= tvd(logits_S, logits_T, mask=mask).item() <= 1


# ------------------------------------------------------------------------ masks, edge cases
@pytest.mark.parametrize("chunk_rows", [None, 4])
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_all_masked_is_zero_with_finite_zero_gradients(name, params, chunk_rows):
    logits_S, logits_T, mask, _ = _inputs(5)
    value, g_S, g_T = _value_and_grads(lambda s, t: divergence_loss(
        name, s, t, mask=torch.zeros_like(mask), chunk_rows=chunk_rows, compile_blocks=False,
        **params), logits_S, logits_T)
    assert value.item() == 0.0
    assert (g_S == 0).all() and (g_T == 0).all()


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_non_finite_masked_rows_take_no_part(chunk_rows):
    logits_S, logits_T, mask, _ = _inputs(6)
    poisoned_S, poisoned_T = logits_S.clone(), logits_T.clone()
    poisoned_S[mask == 0] = float("inf")
    poisoned_T[mask == 0] = float("nan")
    for name, params in CASES:
        clean = _value_and_grads(lambda s, t, n=name, p=params: divergence_loss(
            n, s, t, mask=mask, chunk_rows=chunk_rows, compile_blocks=False, **p),
            logits_S, logits_T)
        dirty = _value_and_grads(lambda s, t, n=name, p=params: divergence_loss(
            n, s, t, mask=mask, chunk_rows=chunk_rows, compile_blocks=False, **p),
            poisoned_S, poisoned_T)
        for c, d in zip(clean, dirty, strict=True):
            torch.testing.assert_close(d, c)


def test_inputs_are_not_modified():
    logits_S, logits_T, mask, tau = _inputs(7)
    for name, params in CASES:
        for chunk_rows in (None, 4):
            call_and_check_untouched(lambda s, t, m, tt, n=name, p=params, c=chunk_rows:
                                     divergence_loss(n, s, t, temperature=tt, mask=m,
                                                     chunk_rows=c, compile_blocks=False, **p),
                                     logits_S, logits_T, mask, tau)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_half_precision_logits_reduce_in_float32(dtype, chunk_rows):
    logits_S, logits_T, mask, _ = _inputs(8, dtype=torch.float32)
    low_S, low_T = logits_S.to(dtype), logits_T.to(dtype)
    for name, params in CASES:
        value, g_S, _ = _value_and_grads(lambda s, t, n=name, p=params: divergence_loss(
            n, s, t, temperature=2.0, mask=mask, chunk_rows=chunk_rows, compile_blocks=False,
            **p), low_S, low_T)
        assert value.dtype == torch.float32 and g_S.dtype == dtype
        # the same values, upcast: equal up to float32 rounding (softmaxes are not in half)
        want = reference(name, low_S.double(), low_T.double(), 2.0, mask, "mean", **params)
        torch.testing.assert_close(value.double(), want, atol=1e-5, rtol=1e-5)


def test_large_inputs_switch_to_row_blocks(monkeypatch):
    from purekd.losses import _blockwise

    calls = []
    original = _blockwise.blockwise_on_logits

    def spy(*args, **kwargs):
        calls.append(kwargs["chunk_rows"])
        return original(*args, **{**kwargs, "compile_blocks": False})

    from purekd.losses import _family

    monkeypatch.setattr(_family, "blockwise_on_logits", spy)
    monkeypatch.setattr(_logits, "CHUNKED_KD_MIN_ELEMENTS", 100)
    logits_S, logits_T, mask, _ = _inputs(9)
    small = jsd(logits_S[:1, :1], logits_T[:1, :1])
    assert calls == []
    big = jsd(logits_S, logits_T, mask=mask)
    assert len(calls) == 1
    monkeypatch.setattr(_logits, "CHUNKED_KD_MIN_ELEMENTS", 1 << 24)
    torch.testing.assert_close(big, jsd(logits_S, logits_T, mask=mask))
    assert small.shape == ()


def test_shared_vocab_compares_the_first_entries_and_a_mismatch_raises():
    logits_S, logits_T, mask, _ = _inputs(10)
    padded_T = torch.cat([logits_T, torch.randn(3, 5, 4, dtype=torch.float64)], -1)
    for name, params in CASES:
        with pytest.raises(ValueError, match=r"11 .*15.*shared_vocab=True"):
            divergence_loss(name, logits_S, padded_T, **params)
        for chunk_rows in (None, 4):
            got = _value_and_grads(lambda s, t, n=name, p=params, c=chunk_rows: divergence_loss(
                n, s, t, mask=mask, shared_vocab=True, chunk_rows=c, compile_blocks=False, **p),
                logits_S, padded_T)
            want = _value_and_grads(lambda s, t, n=name, p=params: reference(
                n, s, t[..., :11], 1.0, mask, "mean", **p), logits_S, padded_T)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w)
            assert (got[2][..., 11:] == 0).all()  # the padding rows get no gradient


# ------------------------------------------------------------------------ compilation
def test_no_graph_break_on_either_path():
    logits_S, logits_T, mask, tau = _inputs(11, dtype=torch.float32)
    for name, params in CASES:
        for chunk_rows in (None, 4) if name in ("jsd", "tvd") else (None,):
            breaks = count_graph_breaks(lambda s, t, m, tt, n=name, p=params, c=chunk_rows:
                                        divergence_loss(n, s, t, temperature=tt, mask=m,
                                                        chunk_rows=c, **p),
                                        logits_S, logits_T, mask, tau)
            assert breaks == 0, (name, chunk_rows)


def test_compiled_equals_eager():
    logits_S, logits_T, mask, tau = _inputs(12, dtype=torch.float32)

    def all_losses(s, t, m, tt):
        return [fn(s, t, temperature=tt, mask=m) for fn in PUBLIC.values()]

    torch._dynamo.reset()
    try:
        compiled = torch.compile(all_losses, fullgraph=True, backend="aot_eager")(
            logits_S, logits_T, mask, tau)
    finally:
        torch._dynamo.reset()
    for c, e in zip(compiled, all_losses(logits_S, logits_T, mask, tau), strict=True):
        torch.testing.assert_close(c, e)


# ------------------------------------------------------------------------ bad input
def test_bad_input_raises_naming_the_argument():
    logits_S, logits_T, mask, _ = _inputs(13)
    with pytest.raises(ValueError, match=r"beta=1.5.*\[0, 1\]"):
        jsd(logits_S, logits_T, beta=1.5)
    with pytest.raises(ValueError, match=r"beta=-0.1"):
        scaled_jsd(logits_S, logits_T, beta=-0.1)
    for bad in (0.0, 1.0, 1.2):
        with pytest.raises(ValueError, match=rf"alpha={bad}.*\(0, 1\)"):
            skew_forward_kl(logits_S, logits_T, alpha=bad)
        with pytest.raises(ValueError, match=rf"alpha={bad}"):
            skew_reverse_kl(logits_S, logits_T, alpha=bad)
    for bad_tau in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"temperature.*> 0"):
            forward_kl(logits_S, logits_T, temperature=bad_tau)
    with pytest.raises(ValueError, match="temperature"):
        tvd(logits_S, logits_T, temperature=torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 4\).*\(3, 5\)"):
        reverse_kl(logits_S, logits_T, mask=mask[:, :4])
    with pytest.raises(ValueError, match="reduction='batchmean'"):
        forward_kl(logits_S, logits_T, reduction="batchmean")
    with pytest.raises(ValueError, match="different rows"):
        forward_kl(logits_S, logits_T[:, :4])
    with pytest.raises(ValueError, match=r"unknown loss=.kl.*forward_kl"):
        divergence_loss("kl", logits_S, logits_T)
    with pytest.raises(TypeError, match="beta"):
        divergence_loss("forward_kl", logits_S, logits_T, beta=0.5)
