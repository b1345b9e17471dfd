"""Fused output-layer losses: equal to the loss on materialised logits in value and in every
gradient, for every loss, with and without bias, across chunk sizes; the student's CE in the
same pass; all-ignored; bf16; shared vocabularies; compiled kernels; bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from purekd.losses import (
    DenseTeacher,
    TopkTeacher,
    _blockwise,
    fused_linear_distill,
    fused_linear_kd,
    fused_linear_topk_kl,
)
from purekd.losses._family import divergence_loss
from purekd.losses._topk import topk_loss
from tests.conftest import call_and_check_untouched, count_graph_breaks, generator


@pytest.fixture(autouse=True)
def _eager_blocks(monkeypatch):
    """Block kernels run eagerly (same code) except in the test that compiles them."""
    monkeypatch.setattr(_blockwise, "COMPILE_BLOCKS", False)


DENSE = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.4}), ("jsd", {"beta": 1.0}),
         ("scaled_jsd", {"beta": 0.6}), ("skew_forward_kl", {"alpha": 0.2}),
         ("skew_reverse_kl", {"alpha": 0.3}), ("tvd", {})]
TOPK = [("topk_kl", {"tail": False}), ("topk_kl", {"tail": True}),
        ("topk_reverse_kl", {"tail": False}), ("topk_reverse_kl", {"tail": True}),
        ("topk_jsd", {"tail": False, "beta": 0.5}), ("topk_jsd", {"tail": True, "beta": 0.2})]
N, H_S, H_T, V, K = 23, 6, 5, 17, 4


def _inputs(seed, dtype=torch.float64, vocab_T=V):
    gen = generator(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=dtype))

    student = {"hidden_S": randn(N, H_S), "weight_S": randn(V, H_S, scale=0.7),
               "bias_S": randn(V, scale=0.5)}
    teacher = DenseTeacher(randn(N, H_T), randn(vocab_T, H_T), randn(vocab_T))
    mask = (torch.rand(N, generator=gen) > 0.25).long()
    mask[0] = 1
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < 0.3] = -100
    logits_T = teacher.hidden @ teacher.weight.T + teacher.bias
    logprobs, ids = torch.log_softmax(logits_T.double(), -1).topk(K, dim=-1)
    return student, teacher, mask, labels, ids, logprobs.to(dtype)


def _grads(fn, student, bias):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in student.items()}
    if not bias:
        leaves.pop("bias_S")
    value = fn(**leaves)
    return (value, *torch.autograd.grad(value, list(leaves.values())))


def _logits(hidden_S, weight_S, bias_S=None):
    logits = hidden_S @ weight_S.T
    return logits if bias_S is None else logits + bias_S


def _assert_close(got, want, **tolerance):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tolerance)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [None, 7, 1])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("loss", "params"), DENSE, ids=[f"{n}{list(p.values())}" for n, p in DENSE])
def test_dense_teacher_equals_materialised_logits(loss, params, bias, chunk_rows, reduction):
    student, teacher, mask, _, _, _ = _inputs(0)
    bias_T = teacher.bias if bias else None
    logits_T = _logits(teacher.hidden, teacher.weight, bias_T)
    want = _grads(lambda **s: divergence_loss(loss, _logits(**s), logits_T, temperature=1.7,
                                              mask=mask, reduction=reduction, **params),
                  student, bias)
    got = _grads(lambda **s: fused_linear_kd(
        s["hidden_S"], s["weight_S"], teacher.hidden, teacher.weight, loss=loss,
        temperature=1.7, mask=mask, reduction=reduction, bias_S=s.get("bias_S"), bias_T=bias_T,
        chunk_rows=chunk_rows, **params), student, bias)
    _assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("chunk_rows", [None, 7])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("loss", "params"), TOPK, ids=[f"{n}{list(p.values())}" for n, p in TOPK])
def test_topk_teacher_equals_materialised_logits(loss, params, bias, chunk_rows):
    student, _, mask, _, ids, logprobs = _inputs(1)
    tau = 1.0 if params["tail"] else 0.8
    want = _grads(lambda **s: topk_loss(loss, _logits(**s), ids, logprobs, temperature=tau,
                                        mask=mask, **params), student, bias)
    got = _grads(lambda **s: fused_linear_topk_kl(
        s["hidden_S"], s["weight_S"], ids, logprobs, loss=loss, temperature=tau, mask=mask,
        bias_S=s.get("bias_S"), chunk_rows=chunk_rows, **params), student, bias)
    _assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 1.6])  # 1: the KD and the CE share a softmax
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hard_label_cross_entropy_in_the_same_pass(teacher_kind, reduction, temperature):
    student, teacher, mask, labels, ids, logprobs = _inputs(2)
    kd_weight, ce_weight = 0.7, 0.4
    logits_T = _logits(teacher.hidden, teacher.weight, teacher.bias)

    def reference(**s):
        logits = _logits(**s)
        if teacher_kind == "dense":
            kd = divergence_loss("jsd", logits, logits_T, mask=mask, reduction=reduction,
                                 beta=0.3, temperature=temperature)
        else:
            kd = topk_loss("topk_kl", logits, ids, logprobs, mask=mask, reduction=reduction,
                           temperature=temperature)
        ce = F.cross_entropy(logits, labels, reduction=reduction)
        return torch.stack([kd_weight * kd + ce_weight * ce, kd, ce])

    source = teacher if teacher_kind == "dense" else TopkTeacher(ids, logprobs)
    args = {"beta": 0.3} if teacher_kind == "dense" else {}
    loss = "jsd" if teacher_kind == "dense" else None
    outputs = {}

    def fused(**s):
        out = fused_linear_distill(s["hidden_S"], s["weight_S"], source, loss=loss,
                                   bias_S=s["bias_S"], mask=mask, reduction=reduction,
                                   temperature=temperature,
                                   labels=labels, kd_weight=kd_weight, ce_weight=ce_weight,
                                   chunk_rows=5, **args)
        outputs["out"] = out
        return out.loss

    got = _grads(fused, student, bias=True)
    want_values = reference(**student)
    want = _grads(lambda **s: reference(**s)[0], student, bias=True)
    _assert_close(got, want, atol=1e-12, rtol=1e-10)
    out = outputs["out"]
    torch.testing.assert_close(torch.stack([out.loss.detach(), out.kd, out.ce]), want_values)
    assert not out.kd.requires_grad and not out.ce.requires_grad


def test_all_ignored_is_zero_with_zero_gradients():
    student, teacher, mask, labels, ids, logprobs = _inputs(3)
    for source in (teacher, TopkTeacher(ids, logprobs)):
        value, *grads = _grads(lambda s=source, **st: fused_linear_distill(
            st["hidden_S"], st["weight_S"], s, bias_S=st["bias_S"], mask=torch.zeros_like(mask),
            labels=torch.full_like(labels, -100), chunk_rows=4).loss, student, bias=True)
        assert value.item() == 0.0
        for g in grads:
            assert torch.isfinite(g).all() and (g == 0).all()


@given(seed=st.integers(0, 10_000), chunk_rows=st.integers(1, N + 3))
def test_chunk_size_changes_nothing_beyond_rounding(seed, chunk_rows):
    student, teacher, mask, labels, ids, logprobs = _inputs(seed, dtype=torch.float32)
    for source, loss in ((teacher, "jsd"), (TopkTeacher(ids, logprobs), "topk_kl")):
        one = _grads(lambda s=source, lo=loss, **st: fused_linear_distill(
            st["hidden_S"], st["weight_S"], s, loss=lo, bias_S=st["bias_S"], mask=mask,
            labels=labels, chunk_rows=N).loss, student, bias=True)
        many = _grads(lambda s=source, lo=loss, **st: fused_linear_distill(
            st["hidden_S"], st["weight_S"], s, loss=lo, bias_S=st["bias_S"], mask=mask,
            labels=labels, chunk_rows=chunk_rows).loss, student, bias=True)
        _assert_close(many, one, atol=1e-5, rtol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    student, teacher, mask, _, _, _ = _inputs(4, dtype=torch.float32)
    low = {k: v.bfloat16() for k, v in student.items()}
    low_teacher = DenseTeacher(*(t.bfloat16() for t in teacher))
    # the reference: the same bf16 numbers, upcast, on materialised float64 logits
    exact = {k: v.double() for k, v in low.items()}
    logits_T = _logits(*(t.double() for t in low_teacher))
    want = _grads(lambda **s: divergence_loss("jsd", _logits(**s), logits_T, mask=mask),
                  exact, bias=True)
    got = _grads(lambda **s: fused_linear_kd(
        s["hidden_S"], s["weight_S"], low_teacher.hidden, low_teacher.weight, loss="jsd",
        mask=mask, bias_S=s["bias_S"], bias_T=low_teacher.bias, chunk_rows=6), low, bias=True)
    assert got[0].dtype == torch.float32
    assert [g.dtype for g in got[1:]] == [torch.bfloat16] * 3
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-6, rtol=1e-6)
    for g, w in zip(got[1:], want[1:], strict=True):  # only the final rounding to bf16
        torch.testing.assert_close(g.double(), w, atol=1e-6, rtol=2 ** -8)


def test_teacher_gets_no_gradient_and_inputs_are_untouched():
    student, teacher, mask, labels, ids, logprobs = _inputs(5)
    hidden_T = teacher.hidden.clone().requires_grad_(True)
    weight_T = teacher.weight.clone().requires_grad_(True)
    hidden_S = student["hidden_S"].clone().requires_grad_(True)
    fused_linear_kd(hidden_S, student["weight_S"], hidden_T, weight_T, loss="tvd").backward()
    assert hidden_T.grad is None and weight_T.grad is None and hidden_S.grad is not None
    call_and_check_untouched(lambda h, w, b, ht, wt, bt, m, y: fused_linear_distill(
        h, w, DenseTeacher(ht, wt, bt), bias_S=b, mask=m, labels=y, chunk_rows=5).loss,
        *student.values(), *teacher, mask, labels)
    call_and_check_untouched(lambda h, w, i, lp, m: fused_linear_topk_kl(
        h, w, i, lp, tail=True, mask=m, chunk_rows=5), student["hidden_S"], student["weight_S"],
        ids, logprobs, mask)


def test_three_dimensional_rows():
    student, teacher, mask, _, ids, logprobs = _inputs(6)
    hidden_S = student["hidden_S"][:20].reshape(4, 5, H_S)
    hidden_T = teacher.hidden[:20].reshape(4, 5, H_T)
    flat = fused_linear_kd(student["hidden_S"][:20], student["weight_S"], teacher.hidden[:20],
                           teacher.weight, mask=mask[:20])
    shaped = fused_linear_kd(hidden_S, student["weight_S"], hidden_T, teacher.weight,
                             mask=mask[:20].reshape(4, 5))
    torch.testing.assert_close(shaped, flat)
    top = fused_linear_topk_kl(hidden_S, student["weight_S"], ids[:20].reshape(4, 5, K),
                               logprobs[:20].reshape(4, 5, K), mask=mask[:20].reshape(4, 5))
    torch.testing.assert_close(top, fused_linear_topk_kl(student["hidden_S"][:20],
                                                         student["weight_S"], ids[:20],
                                                         logprobs[:20], mask=mask[:20]))


def test_shared_vocab_option_and_the_mismatch_error():
    student, teacher, mask, _, _, _ = _inputs(7, vocab_T=V + 3)  # a padded teacher layer
    with pytest.raises(ValueError, match=rf"{V} .*{V + 3}.*shared_vocab=True"):
        fused_linear_kd(student["hidden_S"], student["weight_S"], teacher.hidden, teacher.weight)
    logits_T = _logits(*teacher)
    for bias in (False, True):
        want = _grads(lambda **s: divergence_loss("jsd", _logits(**s), logits_T, mask=mask,
                                                  shared_vocab=True), student, bias)
        got = _grads(lambda **s: fused_linear_kd(
            s["hidden_S"], s["weight_S"], teacher.hidden, teacher.weight, loss="jsd",
            bias_S=s.get("bias_S"), bias_T=teacher.bias, mask=mask, shared_vocab=True,
            chunk_rows=6), student, bias)
        _assert_close(got, want, atol=1e-12, rtol=1e-10)
    # a padded student layer: its extra rows get a zero gradient
    big, small, _, _, _, _ = _inputs(8)
    weight_S = torch.cat([big["weight_S"], torch.randn(3, H_S, dtype=torch.float64)])
    weight_S.requires_grad_(True)
    fused_linear_kd(big["hidden_S"], weight_S, small.hidden, small.weight,
                    shared_vocab=True).backward()
    assert weight_S.grad is not None and (weight_S.grad[V:] == 0).all()


def test_compiled_kernels_equal_eager_with_no_graph_break(monkeypatch):
    student, teacher, mask, labels, ids, logprobs = _inputs(9, dtype=torch.float32)
    cases = [(teacher, "jsd", {"beta": 0.5}), (TopkTeacher(ids, logprobs), "topk_kl", {})]
    for source, loss, args in cases:
        results = []
        for compile_blocks in (False, True):
            monkeypatch.setattr(_blockwise, "COMPILE_BLOCKS", compile_blocks)
            results.append(_grads(lambda s=source, lo=loss, a=args, **st: fused_linear_distill(
                st["hidden_S"], st["weight_S"], s, loss=lo, bias_S=st["bias_S"], mask=mask,
                labels=labels, chunk_rows=8, **a).loss, student, bias=True))
        _assert_close(results[1], results[0], atol=1e-6, rtol=1e-5)
    monkeypatch.setattr(_blockwise, "COMPILE_BLOCKS", False)
    assert count_graph_breaks(lambda h, w, ht, wt, m: fused_linear_kd(
        h, w, ht, wt, loss="jsd", mask=m), student["hidden_S"], student["weight_S"],
        teacher.hidden, teacher.weight, mask) == 0
    assert count_graph_breaks(lambda h, w, i, lp, y: fused_linear_distill(
        h, w, TopkTeacher(i, lp), labels=y).loss, student["hidden_S"], student["weight_S"],
        ids, logprobs, labels) == 0


def test_bad_input_raises_naming_the_argument():
    student, teacher, mask, labels, ids, logprobs = _inputs(10)
    h, w = student["hidden_S"], student["weight_S"]
    with pytest.raises(ValueError, match=r"hidden_S of width 6.*weight_S \(17, 5\)"):
        fused_linear_kd(h, w[:, :5], teacher.hidden, teacher.weight)
    with pytest.raises(ValueError, match=r"hidden_T of width 5.*weight_T"):
        fused_linear_kd(h, w, teacher.hidden, teacher.weight[:, :4])
    with pytest.raises(ValueError, match=r"hidden_S \(23, 6\) and hidden_T \(22, 5\).*rows"):
        fused_linear_kd(h, w, teacher.hidden[:22], teacher.weight)
    with pytest.raises(ValueError, match=r"mask of shape \(22,\)"):
        fused_linear_kd(h, w, teacher.hidden, teacher.weight, mask=mask[:22])
    with pytest.raises(ValueError, match=r"labels of shape \(22,\)"):
        fused_linear_distill(h, w, teacher, labels=labels[:22])
    with pytest.raises(ValueError, match=r"bias_S \(16,\)"):
        fused_linear_kd(h, w, teacher.hidden, teacher.weight, bias_S=student["bias_S"][:16])
    with pytest.raises(ValueError, match="beta=-1"):
        fused_linear_kd(h, w, teacher.hidden, teacher.weight, loss="jsd", beta=-1)
    with pytest.raises(ValueError, match=r"alpha=0\b"):
        fused_linear_kd(h, w, teacher.hidden, teacher.weight, loss="skew_reverse_kl", alpha=0)
    with pytest.raises(ValueError, match=r"temperature=-2"):
        fused_linear_kd(h, w, teacher.hidden, teacher.weight, temperature=-2)
    with pytest.raises(ValueError, match="unknown loss='topk_kl'"):
        fused_linear_kd(h, w, teacher.hidden, teacher.weight, loss="topk_kl")
    with pytest.raises(ValueError, match="unknown top-k loss='jsd'"):
        fused_linear_topk_kl(h, w, ids, logprobs, loss="jsd")
    outside = ids.clone()
    outside[3, 1] = V
    with pytest.raises(ValueError, match=r"ids_T.*outside.*\[0, 17\)"):
        fused_linear_topk_kl(h, w, outside, logprobs)
    with pytest.raises(ValueError, match="tail=True needs temperature=1"):
        fused_linear_topk_kl(h, w, ids, logprobs, tail=True, temperature=2.0)
    bad_labels = labels.clone()
    bad_labels[0] = V
    with pytest.raises(ValueError, match=r"labels.*outside \[0, 17\)"):
        fused_linear_distill(h, w, teacher, labels=bad_labels)
    with pytest.raises(TypeError, match=r"DenseTeacher.*TopkTeacher"):
        fused_linear_distill(h, w, (teacher.hidden, teacher.weight))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_rows=0"):
        fused_linear_kd(h, w, teacher.hidden, teacher.weight, chunk_rows=0)


def test_an_outer_factor_scales_every_gradient():
    student, teacher, mask, labels, _, _ = _inputs(11)
    fn = lambda **s: fused_linear_distill(  # noqa: E731
        s["hidden_S"], s["weight_S"], teacher, loss="reverse_kl", bias_S=s["bias_S"],
        mask=mask, labels=labels, chunk_rows=6).loss
    once = _grads(fn, student, bias=True)
    scaled = _grads(lambda **s: -2.5 * fn(**s), student, bias=True)
    _assert_close(scaled, [-2.5 * g for g in once])


def test_default_blocks_are_large_enough_for_the_weight_gradient_product():
    # many rows: about 16 Mi logits a block, a multiple of 8 rows, never below 128 rows (the
    # weight gradient's product reduces over them)
    assert _blockwise.default_chunk_rows(4096, 49152, fused=True) == 336
    assert _blockwise.default_chunk_rows(2048, 128256, fused=True) == 128
    assert _blockwise.default_chunk_rows(4096, 256000, fused=True) == 128
    assert _blockwise.default_chunk_rows(4096, 49152) == 168  # the on-logits losses: 8 Mi


def test_few_rows_take_about_eight_blocks_of_at_least_64_rows():
    # each block is a pass over the (V, H) weight gradient: few rows can afford small blocks
    assert _blockwise.default_chunk_rows(256, 49152, fused=True) == 64
    assert _blockwise.default_chunk_rows(1024, 49152, fused=True) == 128
    assert _blockwise.default_chunk_rows(2000, 49152, fused=True) == 256
    assert _blockwise.default_chunk_rows(50, 128256, fused=True) == 50  # never more than rows
    assert _blockwise.default_chunk_rows(100, 49152, fused=True) == 64


def test_a_traced_fused_loss_takes_fewer_larger_blocks(monkeypatch):
    # inside a compiled graph each block's weight-gradient accumulation costs a (V, H) copy
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _blockwise.default_chunk_rows(4096, 49152, fused=True) == 336
    assert _blockwise.default_chunk_rows(4096, 256000, fused=True) == 128
    assert _blockwise.default_chunk_rows(4096, 49152) == 168  # the on-logits losses: unchanged


def test_a_last_block_shorter_than_the_others_reuses_the_buffers_correctly():
    student, teacher, mask, labels, _, _ = _inputs(11)
    rows = student["hidden_S"].shape[0]
    results = [_grads(lambda c=c, **st: fused_linear_distill(
        st["hidden_S"], st["weight_S"], teacher, loss="jsd", beta=0.3, mask=mask, labels=labels,
        bias_S=st["bias_S"], chunk_rows=c).loss, student, bias=True) for c in (rows, 5)]
    _assert_close(results[1], results[0])
