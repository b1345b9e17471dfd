"""losses.aligned_uld_topk / aligned_gold_topk: ULD and GOLD over aligned spans from a top-k
teacher (a cross-tokenizer cache). At k = V_T both equal the dense aligned losses; ULD equals
the live aligned_uld(top_k=k) at any k; GOLD matches float64 references of its two tail
conventions (the matched head with the tail in total; the uniform tail) in value and gradient;
bad input."""

from __future__ import annotations

import math

import pytest
import torch

from purekd import losses
from purekd.losses import TopkSpanTeacher

from .test_gold import MATCHED_S, MATCHED_T, VOCABULARY_MAP, jsd_reference
from .test_uld import PAIRS, make_spans, merged_reference, sorted_l1_reference

V_S, V_T = 6, 11


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    logits_S = torch.randn(2, 4, V_S, generator=generator, dtype=torch.float64) * 2
    logits_T = torch.randn(2, 4, V_T, generator=generator, dtype=torch.float64) * 2
    return logits_S, logits_T


def topk_teacher(logits_T, k, pairs=PAIRS, dtype=None):
    """The teacher's top-k of dense logits, with next_logprobs[r] = log p_r(the token the spans
    say row r predicts) (other rows: their own top token)."""
    flat = logits_T.reshape(-1, logits_T.size(-1))
    logp = torch.log_softmax(flat, -1)
    values, ids = logp.topk(k, -1)
    following = values[:, 0].clone()
    for _, (rows, tokens) in pairs:
        for row, token in zip(rows, tokens, strict=True):
            following[row] = logp[row, token]
    if dtype is not None:
        values, following = values.to(dtype), following.to(dtype)
    return TopkSpanTeacher(ids.view(*logits_T.shape[:-1], k), values.view(*logits_T.shape[:-1], k),
                           following.view(logits_T.shape[:-1]), logits_T.size(-1))


def value_and_grad(fn, logits_S):
    student = logits_S.clone().requires_grad_()
    value = fn(student)
    (grad,) = torch.autograd.grad(value, student)
    return value, grad


@pytest.mark.parametrize("options", [dict(blockwise=False), dict(chunk_spans=1), dict()])
def test_uld_at_k_equal_v_is_the_dense_aligned_uld(logits, options):
    logits_S, logits_T = logits
    spans = make_spans(PAIRS)
    teacher = topk_teacher(logits_T, V_T)
    got = value_and_grad(lambda z: losses.aligned_uld_topk(z, teacher, spans, **options), logits_S)
    want = value_and_grad(lambda z: losses.aligned_uld(z, logits_T, spans), logits_S)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 4, 7, 10])
@pytest.mark.parametrize("top_k", [None, 3])
def test_uld_from_top_k_is_the_live_uld_with_that_head(logits, k, top_k):
    # the same sorted head and the tails in total: no approximation beyond the live top_k's
    logits_S, logits_T = logits
    spans = make_spans(PAIRS)
    teacher = topk_teacher(logits_T, k)
    head = k if top_k is None else min(k, top_k)
    got = value_and_grad(lambda z: losses.aligned_uld_topk(z, teacher, spans, top_k=top_k),
                         logits_S)
    want = value_and_grad(lambda z: losses.aligned_uld(z, logits_T, spans, top_k=head), logits_S)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_uld_head_and_tail_by_hand():
    # one one-token span each side; student p = [.5, .3, .2]; teacher top-2 of [.6, .25, .15]
    logits_S = torch.tensor([[0.5, 0.3, 0.2]]).log()
    teacher = TopkSpanTeacher(torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.25]]).log(),
                              torch.tensor([0.0]), 3)
    spans = make_spans([(([0], [1]), ([0], [1]))])
    # heads sorted: [.5, .3] vs [.6, .25]: .1 + .05; tails: .2 vs .15: .05
    value = losses.aligned_uld_topk(logits_S, teacher, spans)
    assert value.item() == pytest.approx(0.2, abs=1e-6)


@pytest.mark.parametrize("params", [dict(), dict(beta=0.9), dict(loss="forward_kl"),
                                    dict(matched_weight=0.3, unmatched_weight=2.0, top_k=2),
                                    dict(loss="tvd", top_k=9), dict(loss="reverse_kl", top_k=6),
                                    dict(matched_weight=1.0, unmatched_weight=0.0)])
@pytest.mark.parametrize("options", [dict(blockwise=False), dict(chunk_spans=2)])
@pytest.mark.parametrize("tail", ["total", "uniform"])
def test_gold_at_k_equal_v_is_the_dense_aligned_gold(logits, params, options, tail):
    logits_S, logits_T = logits
    spans = make_spans(PAIRS)
    teacher = topk_teacher(logits_T, V_T)
    got = value_and_grad(lambda z: losses.aligned_gold_topk(z, teacher, spans, VOCABULARY_MAP,
                                                            tail=tail, **params, **options),
                         logits_S)
    want = value_and_grad(lambda z: losses.aligned_gold(z, logits_T, spans, VOCABULARY_MAP,
                                                        **params), logits_S)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_float32_at_k_equal_v_within_1e_6(logits):
    logits_S, logits_T = (t.float() for t in logits)
    spans = make_spans(PAIRS)
    teacher = topk_teacher(logits_T, V_T)
    for topk_loss, dense_loss in (
            (lambda z: losses.aligned_uld_topk(z, teacher, spans),
             lambda z: losses.aligned_uld(z, logits_T, spans)),
            (lambda z: losses.aligned_gold_topk(z, teacher, spans, VOCABULARY_MAP),
             lambda z: losses.aligned_gold(z, logits_T, spans, VOCABULARY_MAP))):
        got, want = value_and_grad(topk_loss, logits_S), value_and_grad(dense_loss, logits_S)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def completed_reference(logits_T, k, row):
    """The teacher's row from its top-k: the k stored probabilities, the rest spread evenly."""
    p = torch.softmax(logits_T[row], -1)
    top = p.topk(k).indices
    q = torch.full_like(p, float((1 - p[top].sum()) / (p.numel() - k)) if k < p.numel() else 0.0)
    q[top] = p[top]
    return q


def gold_topk_reference(logits_S, logits_T, k, pairs, beta=0.5):
    w_m = len(MATCHED_T) / V_T
    rest_S = [v for v in range(V_S) if v not in MATCHED_S]
    rest_T = [v for v in range(V_T) if v not in MATCHED_T]
    values = []
    for s, (rows, tokens) in pairs:
        q_S = merged_reference(logits_S, *s)
        q_T = completed_reference(logits_T, k, rows[0])
        for row, token in zip(rows[1:], tokens[1:], strict=True):
            q_T = q_T * torch.softmax(logits_T[row], -1)[token]  # exact: stored per row
        matched = jsd_reference(q_S[MATCHED_S], q_T[MATCHED_T], beta)
        values.append(w_m * matched + (1 - w_m) * sorted_l1_reference(q_S[rest_S], q_T[rest_T]))
    return torch.stack(values).mean()


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gold_below_v_matches_the_uniform_tail_reference(logits, k, beta):
    logits_S, logits_T = logits
    teacher = topk_teacher(logits_T, k)
    got = value_and_grad(lambda z: losses.aligned_gold_topk(z, teacher, make_spans(PAIRS),
                                                            VOCABULARY_MAP, beta=beta,
                                                            tail="uniform"), logits_S)
    reference_input = logits_S.reshape(-1, V_S).clone().requires_grad_()
    reference = gold_topk_reference(reference_input, logits_T.reshape(-1, V_T), k, PAIRS, beta)
    (reference_grad,) = torch.autograd.grad(reference, reference_input)
    torch.testing.assert_close(got[0], reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1].reshape(-1, V_S), reference_grad, rtol=1e-10, atol=1e-12)
    assert math.isfinite(got[0].item())


def matched_head_reference(logits_S, logits_T, k, pairs, beta=0.5, w_m=None, w_u=None,
                           top_k=None):
    """GOLD from the teacher's top-k by its definition (tail="total"): per span, the teacher's
    head ids H (its first row's top-k), H_m the matched ones; D on H_m against the student at
    the mapped ids; the sorted L1 of the student's vector without those ids against the
    teacher's unmatched head entries, over the first h' = min(|H| - |H_m|, h) positions, plus the
    difference of the remaining masses (the teacher's: its total minus those h' entries)."""
    if w_m is None:
        w_m = len(MATCHED_T) / V_T
        w_u = 1 - w_m
    to_S = dict(zip(MATCHED_T, MATCHED_S, strict=True))
    values = []
    for s, (rows, tokens) in pairs:
        q_S = merged_reference(logits_S, *s)
        p = torch.softmax(logits_T[rows[0]], -1)
        scale = torch.ones((), dtype=p.dtype)
        for row, token in zip(rows[1:], tokens[1:], strict=True):
            scale = scale * torch.softmax(logits_T[row], -1)[token]
        head = p.topk(k).indices.tolist()
        matched = [v for v in head if v in to_S]
        unmatched = [v for v in head if v not in to_S]
        q_T = p * scale
        part = (jsd_reference(q_S[[to_S[v] for v in matched]], q_T[matched], beta) if matched
                else torch.zeros((), dtype=p.dtype))
        rest_S = q_S[[v for v in range(V_S) if v not in {to_S[m] for m in matched}]]
        s_sorted = rest_S.sort(descending=True).values
        t_sorted = q_T[unmatched].sort(descending=True).values if unmatched else q_T[:0]
        h = k if top_k is None else min(k, top_k)
        used = min(len(unmatched), h)
        s_head = torch.cat([s_sorted, s_sorted.new_zeros(max(0, used - s_sorted.numel()))])
        s_head = s_head[:used]
        total_T = q_T.sum() - q_T[matched].sum()     # the unmatched head and the whole tail
        rest = ((s_head - t_sorted[:used]).abs().sum()
                + ((rest_S.sum() - s_head.sum()) - (total_T - t_sorted[:used].sum())).abs())
        values.append(w_m * part + w_u * rest)
    return torch.stack(values).mean()


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 10])
@pytest.mark.parametrize("params", [dict(beta=0.0), dict(beta=0.5), dict(beta=1.0),
                                    dict(beta=0.5, top_k=2),
                                    dict(beta=0.0, matched_weight=1.0, unmatched_weight=1.0)])
@pytest.mark.parametrize("options", [dict(blockwise=False), dict(chunk_spans=2)])
def test_gold_below_v_matches_the_matched_head_reference(logits, k, params, options):
    logits_S, logits_T = logits
    teacher = topk_teacher(logits_T, k)
    got = value_and_grad(lambda z: losses.aligned_gold_topk(z, teacher, make_spans(PAIRS),
                                                            VOCABULARY_MAP, **params, **options),
                         logits_S)
    reference_input = logits_S.reshape(-1, V_S).clone().requires_grad_()
    names = {"matched_weight": "w_m", "unmatched_weight": "w_u"}
    reference = matched_head_reference(reference_input, logits_T.reshape(-1, V_T), k, PAIRS,
                                       **{names.get(n, n): v for n, v in params.items()})
    (reference_grad,) = torch.autograd.grad(reference, reference_input)
    torch.testing.assert_close(got[0], reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1].reshape(-1, V_S), reference_grad, rtol=1e-10, atol=1e-12)


def test_matched_head_gold_by_hand():
    # one one-token span each side. Student p_S = [.5, .3, .2] (ids 0, 1, 2); teacher
    # p_T = [.6, .25, .1, .05] (ids 0..3), top-2 = ids 0 (matched to student id 2) and 1
    # (unmatched). Forward KL on the matched head: .6 log(.6 / .2). ULD part: the student
    # without id 2, [.5, .3], against the teacher's unmatched head [.25], h' = 1: |.5 - .25|,
    # then the remaining masses: student .3, teacher (1 - .6) - .25 = .15: |.3 - .15|.
    logits_S = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64).log()
    teacher = TopkSpanTeacher(torch.tensor([[0, 1]]),
                              torch.tensor([[0.6, 0.25]], dtype=torch.float64).log(),
                              torch.tensor([0.0], dtype=torch.float64), 4)
    vocabulary_map = losses.VocabularyMap(torch.tensor([2]), torch.tensor([0]))
    spans = make_spans([(([0], [1]), ([0], [1]))])
    value = losses.aligned_gold_topk(logits_S, teacher, spans, vocabulary_map,
                                     loss="forward_kl", matched_weight=1.0, unmatched_weight=1.0)
    want = 0.6 * math.log(0.6 / 0.2) + 0.25 + 0.15
    assert value.item() == pytest.approx(want, rel=1e-12)
    # the two parts alone
    matched = losses.aligned_gold_topk(logits_S, teacher, spans, vocabulary_map,
                                       loss="forward_kl", matched_weight=1.0,
                                       unmatched_weight=0.0)
    assert matched.item() == pytest.approx(0.6 * math.log(0.6 / 0.2), rel=1e-12)


def test_matched_head_gold_without_any_matched_id_is_the_uld_part():
    # an empty vocabulary map: no D part; the ULD part is aligned_uld_topk's (nothing excluded)
    generator = torch.Generator().manual_seed(3)
    logits_S = torch.randn(2, 4, V_S, generator=generator, dtype=torch.float64)
    logits_T = torch.randn(2, 4, V_T, generator=generator, dtype=torch.float64)
    teacher = topk_teacher(logits_T, 4)
    empty = losses.VocabularyMap(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    spans = make_spans(PAIRS)
    got = value_and_grad(lambda z: losses.aligned_gold_topk(
        z, teacher, spans, empty, matched_weight=0.5, unmatched_weight=1.0), logits_S)
    want = value_and_grad(lambda z: losses.aligned_uld_topk(z, teacher, spans), logits_S)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


_ROWS, _VOCAB_S, _VOCAB_T = 64, 3000, 200_000


def _large_teacher_vocabulary():
    """64 one-token spans, a 3,000-token student, a top-8 teacher over a 200,000-token
    vocabulary: the student's logits, the top-k log-probabilities and ids, the teacher, the
    spans."""
    rows, vocab_S, vocab_T, k = _ROWS, _VOCAB_S, _VOCAB_T, 8
    generator = torch.Generator().manual_seed(1)
    logits_S = torch.randn(rows, vocab_S, generator=generator).requires_grad_()
    logprobs = torch.log_softmax(torch.randn(rows, k, generator=generator), -1) - 1.0
    ids = torch.stack([torch.randperm(vocab_T, generator=generator)[:k] for _ in range(rows)])
    teacher = TopkSpanTeacher(ids, logprobs.sort(-1, descending=True).values,
                              torch.full((rows,), -0.5), vocab_T)
    spans = make_spans([(([r], [r % vocab_S]), ([r], [int(ids[r, 0])])) for r in range(rows)])
    return logits_S, logprobs, ids, teacher, spans


def test_matched_head_gold_holds_nothing_of_the_teachers_vocabulary():
    # the teacher side of a block is (spans, k), as for ULD: a large V_T costs nothing
    from .test_uld import PeakMemory

    logits_S, logprobs, ids, teacher, spans = _large_teacher_vocabulary()
    matched_T = ids[:, :4].reshape(-1).unique()     # half of each head is matched
    mapping = losses.VocabularyMap(torch.arange(matched_T.numel()), matched_T)
    with PeakMemory(logits_S, logprobs) as measured:
        value = losses.aligned_gold_topk(logits_S, teacher, spans, mapping, chunk_spans=4,
                                         matched_weight=1.0, unmatched_weight=1.0)
        value.backward()
    grad_bytes = _ROWS * _VOCAB_S * 4
    assert measured.peak < 2 * grad_bytes
    assert measured.peak < 4 * 4 * _VOCAB_T
    assert math.isfinite(value.item())


def test_no_span_gives_zero_with_zero_gradients(logits):
    logits_S, logits_T = logits
    spans = make_spans([(([0], [1]), ([0], [1]))], weight=[0.0])
    teacher = topk_teacher(logits_T, 3)
    for fn in (lambda z: losses.aligned_uld_topk(z, teacher, spans),
               lambda z: losses.aligned_gold_topk(z, teacher, spans, VOCABULARY_MAP),
               lambda z: losses.aligned_gold_topk(z, teacher, spans, VOCABULARY_MAP,
                                                  tail="uniform")):
        value, grad = value_and_grad(fn, logits_S)
        assert value.item() == 0 and torch.equal(grad, torch.zeros_like(grad))


def test_bad_input(logits):
    logits_S, logits_T = logits
    spans = make_spans(PAIRS)
    teacher = topk_teacher(logits_T, 3)
    with pytest.raises(ValueError, match=r"aligned_uld_topk: temperature=2.0, but a top-k "
                                         r"teacher holds log-probabilities at temperature 1"):
        losses.aligned_uld_topk(logits_S, teacher, spans, temperature=2.0)
    with pytest.raises(ValueError, match=r"teacher.ids holds an id outside \[0, 5\)"):
        losses.aligned_gold_topk(logits_S, teacher._replace(vocab_size=5), spans, VOCABULARY_MAP)
    with pytest.raises(ValueError, match=r"teacher.next_logprobs has shape \(2, 3\), expected "
                                         r"the rows \(2, 4\)"):
        losses.aligned_uld_topk(logits_S, teacher._replace(
            next_logprobs=teacher.next_logprobs[:, :3]), spans)
    with pytest.raises(ValueError, match=r"the teacher's k=3 must be in 1..vocab_size=2"):
        losses.aligned_uld_topk(logits_S, teacher._replace(vocab_size=2), spans)
    with pytest.raises(ValueError, match=r"aligned_gold_topk: tail='bucket'; choose 'total' "):
        losses.aligned_gold_topk(logits_S, teacher, spans, VOCABULARY_MAP, tail="bucket")
    with pytest.raises(TypeError, match="must be a TopkSpanTeacher"):
        losses.aligned_uld_topk(logits_S, logits_T, spans)
    with pytest.raises(ValueError, match=r"spans.rows_T holds a row outside \[0, 4\)"):
        losses.aligned_uld_topk(logits_S, TopkSpanTeacher(*(t[:1] for t in teacher[:3]), V_T),
                                spans)


def test_compiled_equals_eager_without_graph_breaks(logits):
    from tests.conftest import count_graph_breaks

    logits_S, logits_T = (t.float() for t in logits)
    spans = make_spans(PAIRS)
    ids, logprobs, following, vocab = topk_teacher(logits_T, 4)

    def both(student, ids, logprobs, following, spans):
        teacher = TopkSpanTeacher(ids, logprobs, following, vocab)
        return (losses.aligned_uld_topk(student, teacher, spans, chunk_spans=2),
                losses.aligned_gold_topk(student, teacher, spans, VOCABULARY_MAP, chunk_spans=2,
                                         top_k=3),
                losses.aligned_gold_topk(student, teacher, spans, VOCABULARY_MAP, chunk_spans=2,
                                         top_k=3, tail="uniform"))

    args = (ids, logprobs.float(), following.float(), spans)
    assert count_graph_breaks(both, logits_S, *args) == 0
    results = []
    for fn in (both, torch.compile(both, fullgraph=True)):
        student = logits_S.clone().requires_grad_()
        values = fn(student, *args)
        grads = torch.autograd.grad(values[0] + 2 * values[1] + 3 * values[2], student)
        results.append((*values, *grads))
    torch._dynamo.reset()
    for compiled, eager in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_uld_from_a_top_k_teacher_holds_nothing_of_the_teachers_vocabulary():
    # the teacher side of a block is (spans, k): a large teacher vocabulary costs nothing
    from .test_uld import PeakMemory

    logits_S, logprobs, _, teacher, spans = _large_teacher_vocabulary()
    with PeakMemory(logits_S, logprobs) as measured:
        value = losses.aligned_uld_topk(logits_S, teacher, spans, chunk_spans=4)
        value.backward()
    grad_bytes = _ROWS * _VOCAB_S * 4
    assert measured.peak < 2 * grad_bytes          # the student's gradient and small blocks
    assert measured.peak < 4 * 4 * _VOCAB_T         # not even four teacher-vocabulary rows
    assert math.isfinite(value.item())
