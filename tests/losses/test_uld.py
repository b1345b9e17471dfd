"""losses.aligned_uld: hand-computed values, a float64 reference in value and gradient, blockwise ==
dense, top-k, no span, bad input, and the memory it holds (measured)."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from purekd import losses
from purekd.losses import AlignedSpans


def make_spans(pairs, weight=None):
    """AlignedSpans from [((rows_S, ids_S), (rows_T, ids_T)), ...] (lists, unpadded)."""
    width_S = max(len(s[0]) for s, _ in pairs)
    width_T = max(len(t[0]) for _, t in pairs)

    def pad(values, width):
        return [list(v) + [0] * (width - len(v)) for v in values]

    return AlignedSpans(
        torch.tensor(pad([s[0] for s, _ in pairs], width_S)),
        torch.tensor(pad([s[1] for s, _ in pairs], width_S)),
        torch.tensor(pad([[1] * len(s[0]) for s, _ in pairs], width_S)).bool(),
        torch.tensor(pad([t[0] for _, t in pairs], width_T)),
        torch.tensor(pad([t[1] for _, t in pairs], width_T)),
        torch.tensor(pad([[1] * len(t[0]) for _, t in pairs], width_T)).bool(),
        torch.tensor(weight if weight is not None else [1.0] * len(pairs)),
    )


def merged_reference(logits, rows, ids, temperature=1.0):
    """The observed merge, by the definition: first distribution times later probabilities."""
    p = torch.softmax(logits[rows[0]].double() / temperature, -1)
    for row, token in zip(rows[1:], ids[1:], strict=True):
        p = p * torch.softmax(logits[row].double() / temperature, -1)[token]
    return p


def sorted_l1_reference(q_S, q_T):
    s, t = q_S.sort(descending=True).values, q_T.sort(descending=True).values
    width = max(s.numel(), t.numel())
    s = torch.cat([s, s.new_zeros(width - s.numel())])
    t = torch.cat([t, t.new_zeros(width - t.numel())])
    return (s - t).abs().sum()


def uld_reference(logits_S, logits_T, pairs, temperature=1.0):
    values = [sorted_l1_reference(merged_reference(logits_S, *s, temperature),
                                  merged_reference(logits_T, *t, temperature))
              for s, t in pairs]
    return torch.stack(values).mean()


def test_hand_computed_single_and_merged_spans():
    # student rows: p0 = [.5, .3, .2], p1 with p1[2] = .5; teacher rows: [.6, .4]
    logits_S = torch.tensor([[0.5, 0.3, 0.2], [0.25, 0.25, 0.5]]).log()
    logits_T = torch.tensor([[0.4, 0.6]]).log()
    single = make_spans([(([0], [1]), ([0], [1]))])
    # sorted: [.5, .3, .2] vs [.6, .4, 0]: .1 + .1 + .2
    assert losses.aligned_uld(logits_S, logits_T, single).item() == pytest.approx(0.4, abs=1e-6)
    # a two-token student span whose second token is id 2 (probability .5 at row 1):
    # q = [.25, .15, .1] vs [.6, .4, 0]: .35 + .25 + .1
    merged = make_spans([(([0, 1], [1, 2]), ([0], [1]))])
    assert losses.aligned_uld(logits_S, logits_T, merged).item() == pytest.approx(0.7, abs=1e-6)
    # both spans: the mean over spans, or their sum
    both = make_spans([(([0], [1]), ([0], [1])), (([0, 1], [1, 2]), ([0], [1]))])
    assert losses.aligned_uld(logits_S, logits_T, both).item() == pytest.approx(0.55, abs=1e-6)
    assert losses.aligned_uld(logits_S, logits_T, both, reduction="sum").item() == pytest.approx(1.1,
                                                                                         abs=1e-6)


PAIRS = [
    (([0], [3]), ([0], [1])),
    (([1, 2], [5, 2]), ([1], [7])),
    (([3], [1]), ([2, 3, 4], [0, 9, 4])),
    (([4, 5, 6], [0, 1, 2]), ([5, 6], [3, 3])),
    (([7], [4]), ([7], [8])),
]


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    logits_S = (torch.randn(2, 4, 6, generator=generator, dtype=torch.float64) * 2)
    logits_T = (torch.randn(2, 4, 11, generator=generator, dtype=torch.float64) * 2)
    return logits_S, logits_T


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("options", [dict(blockwise=False), dict(chunk_spans=1),
                                     dict(chunk_spans=2), dict()])
def test_matches_float64_reference_in_value_and_gradient(logits, temperature, options):
    logits_S, logits_T = logits
    student = logits_S.clone().requires_grad_()
    value = losses.aligned_uld(student, logits_T, make_spans(PAIRS), temperature=temperature, **options)
    (grad,) = torch.autograd.grad(value, student)
    reference_input = logits_S.reshape(-1, 6).clone().requires_grad_()
    reference = uld_reference(reference_input, logits_T.reshape(-1, 11), PAIRS, temperature)
    (reference_grad,) = torch.autograd.grad(reference, reference_input)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad.reshape(-1, 6), reference_grad, rtol=1e-10, atol=1e-12)


def test_float32_blockwise_equals_dense(logits):
    logits_S, logits_T = (t.float() for t in logits)
    spans = make_spans(PAIRS)
    results = []
    for options in (dict(blockwise=False), dict(chunk_spans=2), dict(chunk_spans=1)):
        student = logits_S.clone().requires_grad_()
        value = losses.aligned_uld(student, logits_T, spans, **options)
        results.append((value, torch.autograd.grad(value, student)[0]))
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0])
        torch.testing.assert_close(grad, results[0][1])


def test_top_k(logits):
    logits_S, logits_T = logits
    spans = make_spans(PAIRS)
    full = losses.aligned_uld(logits_S, logits_T, spans)
    # k at least both vocabularies: the full value
    torch.testing.assert_close(losses.aligned_uld(logits_S, logits_T, spans, top_k=11), full)
    # k = 3: the sorted heads, plus the difference of the remaining masses
    values = []
    for s, t in PAIRS:
        q_S = merged_reference(logits_S.reshape(-1, 6), *s)
        q_T = merged_reference(logits_T.reshape(-1, 11), *t)
        head_S, head_T = q_S.topk(3).values, q_T.topk(3).values
        values.append((head_S - head_T).abs().sum()
                      + ((q_S.sum() - head_S.sum()) - (q_T.sum() - head_T.sum())).abs())
    top3 = losses.aligned_uld(logits_S, logits_T, spans, top_k=3)
    torch.testing.assert_close(top3, torch.stack(values).mean(), rtol=1e-12, atol=1e-12)
    assert top3 <= full  # a lower bound of the full value


def test_no_span_is_zero_with_finite_zero_gradients(logits):
    logits_S, logits_T = logits
    student = logits_S.clone().requires_grad_()
    padding = make_spans([(([0], [0]), ([0], [0]))], weight=[0.0])
    for options in (dict(), dict(blockwise=False)):
        value = losses.aligned_uld(student, logits_T, padding, **options)
        (grad,) = torch.autograd.grad(value, student)
        assert value.item() == 0.0
        assert torch.isfinite(grad).all() and not grad.any()


def test_teacher_gets_no_gradient(logits):
    logits_S, logits_T = logits
    teacher = logits_T.clone().requires_grad_()
    value = losses.aligned_uld(logits_S.clone().requires_grad_(), teacher, make_spans(PAIRS))
    value.backward()
    assert teacher.grad is None


def test_bad_input(logits):
    logits_S, logits_T = logits
    spans = make_spans(PAIRS)
    with pytest.raises(ValueError, match=r"^aligned_uld: top_k=0 must be a positive int, or None to "
                                         r"sort the whole vocabulary$"):
        losses.aligned_uld(logits_S, logits_T, spans, top_k=0)
    with pytest.raises(ValueError, match=r"^aligned_uld: temperature=0 must be a number > 0$"):
        losses.aligned_uld(logits_S, logits_T, spans, temperature=0)
    with pytest.raises(ValueError, match=r"^aligned_uld: reduction='none'; choose 'mean' or 'sum'$"):
        losses.aligned_uld(logits_S, logits_T, spans, reduction="none")
    with pytest.raises(ValueError, match=r"^aligned_uld: chunk_spans=0 must be a positive int"):
        losses.aligned_uld(logits_S, logits_T, spans, chunk_spans=0)
    with pytest.raises(ValueError, match=r"^aligned_uld: spans.rows_S holds a row outside \[0, 4\): the "
                                         r"spans were aligned for other logits \(rows of "
                                         r"logits_S flattened to \(4, 6\)\)$"):
        losses.aligned_uld(logits_S[:1], logits_T, spans)
    with pytest.raises(ValueError, match=r"^aligned_uld: spans.ids_T holds a token id outside \[0, 9\), "
                                         r"the vocabulary of logits_T: the tokenizer and the "
                                         r"model differ$"):
        losses.aligned_uld(logits_S, logits_T[..., :9], spans)
    with pytest.raises(ValueError, match=r"^aligned_uld: spans.mask_S has shape \(5, 2\), spans.rows_S "
                                         r"\(5, 3\): they must be equal$"):
        losses.aligned_uld(logits_S, logits_T, spans._replace(mask_S=spans.mask_S[:, :2]))
    with pytest.raises(TypeError, match=r"^aligned_uld: spans must be an AlignedSpans \(from "
                                        r"purekd.stages.align_spans\), got tuple$"):
        losses.aligned_uld(logits_S, logits_T, tuple(spans)[:6])
    # a plain 7-tuple (what a runner's move_to_device makes of the NamedTuple) is accepted
    torch.testing.assert_close(losses.aligned_uld(logits_S, logits_T, tuple(spans)),
                               losses.aligned_uld(logits_S, logits_T, spans))


# --------------------------------------------------------------------------- memory
class PeakMemory(TorchDispatchMode):
    """The peak bytes of tensor storage allocated inside the region and alive at once (each
    storage counted once, freed when its last reference goes). Views of the ``inputs`` (made
    before the region) are not new memory."""

    def __init__(self, *inputs: torch.Tensor) -> None:
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in inputs}
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size == 0 or key in self.live or key in self.existing:
                    continue
                self.live[key] = size
                self.current += size
                self.peak = max(self.peak, self.current)
                self.largest = max(self.largest, size)
                weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def test_blockwise_holds_no_rows_by_vocabulary_tensor():
    rows, vocab_S, vocab_T = 64, 3000, 5000
    generator = torch.Generator().manual_seed(1)
    logits_S = torch.randn(rows, vocab_S, generator=generator).requires_grad_()
    logits_T = torch.randn(rows, vocab_T, generator=generator)
    pairs = [(([r], [r % vocab_S]), ([r], [r % vocab_T])) for r in range(rows - 1)]
    pairs.append((([rows - 1], [0]), ([rows - 1], [0])))
    spans = make_spans(pairs)
    chunk = 4
    block_bytes = chunk * (vocab_S + vocab_T) * 4
    grad_bytes = rows * vocab_S * 4
    full_bytes = rows * (vocab_S + vocab_T) * 4

    with PeakMemory(logits_S, logits_T) as dense:
        value_dense = losses.aligned_uld(logits_S, logits_T, spans, blockwise=False)
        value_dense.backward()
    grad_dense, logits_S.grad = logits_S.grad, None
    with PeakMemory(logits_S, logits_T) as blockwise:
        value = losses.aligned_uld(logits_S, logits_T, spans, chunk_spans=chunk)
        value.backward()
    torch.testing.assert_close(value, value_dense)
    torch.testing.assert_close(logits_S.grad, grad_dense)
    # the dense reference holds (N, V_S + V_T)-sized tensors (the measure sees them) ...
    assert dense.peak > 2 * full_bytes
    # ... blockwise: the gradient for the student's logits (N, V_S) and a few blocks, no more
    assert blockwise.peak < grad_bytes + 16 * block_bytes
    assert blockwise.peak < full_bytes
    assert blockwise.largest <= grad_bytes
    assert math.isfinite(value.item())


def test_bfloat16_logits_are_computed_in_float32(logits):
    logits_S, logits_T = logits
    spans = make_spans(PAIRS)
    student = logits_S.bfloat16().requires_grad_()
    value = losses.aligned_uld(student, logits_T.bfloat16(), spans)
    (grad,) = torch.autograd.grad(value, student)
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    # the same as float32 on the bfloat16 values
    reference = losses.aligned_uld(logits_S.bfloat16().float(), logits_T.bfloat16().float(),
                                   spans)
    torch.testing.assert_close(value, reference)
