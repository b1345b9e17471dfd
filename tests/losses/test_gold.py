"""losses.aligned_gold: a float64 reference in value and gradient, TRL's weighting, one tokenizer on both
sides == the chosen divergence exactly, underflow, bad input."""

from __future__ import annotations

import pytest
import torch

from purekd import losses
from purekd.losses import VocabularyMap
from purekd.stages import align_spans

from .test_uld import PAIRS, make_spans, merged_reference, sorted_l1_reference


def jsd_reference(q_S, q_T, beta):
    """TRL's generalized JSD, on the vectors as they are (sub-probabilities allowed)."""
    def kl(p, q):
        return torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum()

    if beta == 0:
        return kl(q_T, q_S)
    if beta == 1:
        return kl(q_S, q_T)
    m = beta * q_T + (1 - beta) * q_S
    return beta * kl(q_T, m) + (1 - beta) * kl(q_S, m)


MATCHED_S = [0, 2, 5, 3]
MATCHED_T = [4, 1, 9, 0]


def gold_reference(logits_S, logits_T, pairs, beta=0.5, w_m=None, w_u=None):
    vocab_S, vocab_T = logits_S.size(-1), logits_T.size(-1)
    if w_m is None:
        w_m = len(MATCHED_T) / vocab_T
        w_u = 1 - w_m
    rest_S = [v for v in range(vocab_S) if v not in MATCHED_S]
    rest_T = [v for v in range(vocab_T) if v not in MATCHED_T]
    values = []
    for s, t in pairs:
        q_S, q_T = merged_reference(logits_S, *s), merged_reference(logits_T, *t)
        matched = jsd_reference(q_S[MATCHED_S], q_T[MATCHED_T], beta)
        rest = sorted_l1_reference(q_S[rest_S], q_T[rest_T])
        values.append(w_m * matched + w_u * rest)
    return torch.stack(values).mean()


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    logits_S = torch.randn(2, 4, 6, generator=generator, dtype=torch.float64) * 2
    logits_T = torch.randn(2, 4, 11, generator=generator, dtype=torch.float64) * 2
    return logits_S, logits_T


VOCABULARY_MAP = VocabularyMap(torch.tensor(MATCHED_S), torch.tensor(MATCHED_T))


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("options", [dict(blockwise=False), dict(chunk_spans=2), dict()])
def test_matches_float64_reference_in_value_and_gradient(logits, beta, options):
    logits_S, logits_T = logits
    student = logits_S.clone().requires_grad_()
    value = losses.aligned_gold(student, logits_T, make_spans(PAIRS), VOCABULARY_MAP, beta=beta,
                        **options)
    (grad,) = torch.autograd.grad(value, student)
    reference_input = logits_S.reshape(-1, 6).clone().requires_grad_()
    reference = gold_reference(reference_input, logits_T.reshape(-1, 11), PAIRS, beta)
    (reference_grad,) = torch.autograd.grad(reference, reference_input)
    torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad.reshape(-1, 6), reference_grad, rtol=1e-10, atol=1e-12)


def test_configured_weights_and_the_parts(logits):
    logits_S, logits_T = logits
    spans = make_spans(PAIRS)
    flat_S, flat_T = logits_S.reshape(-1, 6), logits_T.reshape(-1, 11)
    both = losses.aligned_gold(logits_S, logits_T, spans, VOCABULARY_MAP, matched_weight=0.3,
                       unmatched_weight=2.0)
    torch.testing.assert_close(both, gold_reference(flat_S, flat_T, PAIRS, w_m=0.3, w_u=2.0))
    # the default is TRL's matched share of the teacher's vocabulary, M / V_T = 4 / 11
    default = losses.aligned_gold(logits_S, logits_T, spans, VOCABULARY_MAP)
    matched = losses.aligned_gold(logits_S, logits_T, spans, VOCABULARY_MAP, matched_weight=1,
                          unmatched_weight=0)
    rest = losses.aligned_gold(logits_S, logits_T, spans, VOCABULARY_MAP, matched_weight=0,
                       unmatched_weight=1)
    torch.testing.assert_close(default, 4 / 11 * matched + 7 / 11 * rest)


def test_hand_computed_matched_columns_are_not_renormalised():
    # student p = [.5, .3, .2], teacher p = [.6, .4]; student id 0 ~ teacher id 1
    logits_S = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64).log()
    logits_T = torch.tensor([[0.6, 0.4]], dtype=torch.float64).log()
    spans = make_spans([(([0], [0]), ([0], [0]))])
    vocabulary_map = VocabularyMap(torch.tensor([0]), torch.tensor([1]))
    # forward KL on the matched column alone: .4 log(.4 / .5); ULD on the rest: [.3, .2] vs
    # [.6]: .3 + .2 = .5; weights 1/2 and 1/2
    value = losses.aligned_gold(logits_S, logits_T, spans, vocabulary_map, loss="forward_kl")
    expected = 0.5 * 0.4 * torch.log(torch.tensor(0.4 / 0.5, dtype=torch.float64)) + 0.5 * 0.5
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize(("loss", "params"), [("jsd", {}), ("jsd", {"beta": 0.1}),
                                              ("forward_kl", {}), ("reverse_kl", {}),
                                              ("tvd", {})])
def test_one_tokenizer_on_both_sides_is_the_divergence_exactly(loss, params):
    # the same tokenisation on both sides: every span is one token, every id matches
    generator = torch.Generator().manual_seed(3)
    batch, length, vocab = 2, 5, 13
    logits_S = torch.randn(batch, length, vocab, generator=generator).requires_grad_()
    logits_T = torch.randn(batch, length, vocab, generator=generator)
    ids = torch.randint(vocab, (batch, length), generator=generator)
    offsets = [[(2 * t, 2 * t + 2) for t in range(length)]] * batch
    spans = align_spans(ids, offsets, ids, offsets)  # shift=1: rows 0..L-2 predict tokens 1..
    identity = VocabularyMap(torch.arange(vocab), torch.arange(vocab))
    value = losses.aligned_gold(logits_S, logits_T, spans, identity, loss=loss, **params)
    mask = torch.ones(batch, length)
    mask[:, -1] = 0  # the last row predicts nothing
    divergence = getattr(losses, loss)
    expected = divergence(logits_S, logits_T, mask=mask, **params)
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(value, logits_S)
    (expected_grad,) = torch.autograd.grad(expected, logits_S)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8)


def test_underflowing_merged_probabilities_keep_gradients_finite():
    # long spans of unlikely tokens: merged probabilities underflow to 0 in float32
    generator = torch.Generator().manual_seed(4)
    logits_S = (torch.randn(8, 6, generator=generator) * 40).requires_grad_()
    logits_T = torch.randn(8, 11, generator=generator) * 40
    worst_S = logits_S.detach().argmin(-1).tolist()
    worst_T = logits_T.argmin(-1).tolist()
    spans = make_spans([((list(range(8)), worst_S), (list(range(8)), worst_T))])
    value = losses.aligned_gold(logits_S, logits_T, spans, VOCABULARY_MAP)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits_S.grad).all()


def test_no_span_is_zero_with_finite_gradients(logits):
    logits_S, logits_T = logits
    student = logits_S.clone().requires_grad_()
    padding = make_spans([(([0], [0]), ([0], [0]))], weight=[0.0])
    value = losses.aligned_gold(student, logits_T, padding, VOCABULARY_MAP)
    (grad,) = torch.autograd.grad(value, student)
    assert value.item() == 0.0 and torch.isfinite(grad).all() and not grad.any()


def test_bad_input(logits):
    logits_S, logits_T = logits
    spans = make_spans(PAIRS)
    with pytest.raises(ValueError, match=r"^aligned_gold: matched_weight=0.5 and unmatched_weight=None: "
                                         r"give both \(numbers >= 0\) or neither \(TRL's "
                                         r"matched share M / V_T and 1 - M / V_T\)$"):
        losses.aligned_gold(logits_S, logits_T, spans, VOCABULARY_MAP, matched_weight=0.5)
    with pytest.raises(ValueError, match=r"^aligned_gold: unmatched_weight=-1 must be a number >= 0$"):
        losses.aligned_gold(logits_S, logits_T, spans, VOCABULARY_MAP, matched_weight=1,
                    unmatched_weight=-1)
    with pytest.raises(ValueError, match=r"^aligned_gold: vocabulary_map.matched_T holds an id outside "
                                         r"\[0, 9\), the width of logits_T: the map was built "
                                         r"for other tokenizers$"):
        losses.aligned_gold(logits_S, logits_T[..., :9], spans._replace(ids_T=spans.ids_T % 9),
                    VOCABULARY_MAP)
    with pytest.raises(ValueError, match=r"^aligned_gold: vocabulary_map.matched_S repeats an id; each "
                                         r"id must be matched at most once$"):
        losses.aligned_gold(logits_S, logits_T, spans,
                    VocabularyMap(torch.tensor([1, 1]), torch.tensor([0, 2])))
    with pytest.raises(ValueError, match=r"^aligned_gold: unknown loss='kl'; choose one of "):
        losses.aligned_gold(logits_S, logits_T, spans, VOCABULARY_MAP, loss="kl")
    with pytest.raises(ValueError, match=r"^aligned_gold: beta=2 is outside \[0, 1\]"):
        losses.aligned_gold(logits_S, logits_T, spans, VOCABULARY_MAP, beta=2)
    with pytest.raises(TypeError, match=r"^aligned_gold: vocabulary_map must be a VocabularyMap"):
        losses.aligned_gold(logits_S, logits_T, spans, (torch.tensor([0]), torch.tensor([0])))


def test_compiled_equals_eager_without_graph_breaks(logits):
    # the blockwise path (the default): its backward recomputes each block under torch.func.grad
    blockwise = True
    from tests.conftest import count_graph_breaks

    logits_S, logits_T = (t.float() for t in logits)
    spans = make_spans(PAIRS)

    def both(student, teacher, spans):
        return (losses.aligned_uld(student, teacher, spans, blockwise=blockwise, chunk_spans=2),
                losses.aligned_gold(student, teacher, spans, VOCABULARY_MAP, blockwise=blockwise,
                            chunk_spans=2, top_k=3))

    assert count_graph_breaks(both, logits_S, logits_T, spans) == 0
    results = []
    for fn in (both, torch.compile(both, fullgraph=True)):
        student = logits_S.clone().requires_grad_()
        values = fn(student, logits_T, spans)
        grads = torch.autograd.grad(values[0] + 2 * values[1], student)
        results.append((*values, *grads))
    torch._dynamo.reset()
    for compiled, eager in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
