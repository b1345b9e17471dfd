"""probability_shift: TextBrewer's probability_shift_, without the in-place write."""

from __future__ import annotations

import pytest
import torch
from textbrewer.distiller_utils import probability_shift_

from purekd.stages import probability_shift
from tests.conftest import (
    assert_all_close,
    call_and_check_untouched,
    compiled_and_eager,
    count_graph_breaks,
    generator,
    randn,
)


def test_hand_computed():
    logits = torch.tensor([[1.0, 5.0, 3.0], [2.0, 0.0, 1.0]])
    labels = torch.tensor([2, 0])  # row 1: the label already has the top logit
    out = probability_shift(logits, labels)
    assert torch.equal(out, torch.tensor([[1.0, 3.0, 5.0], [2.0, 0.0, 1.0]]))
    logits3 = torch.tensor([[[1.0, 5.0, 3.0], [4.0, 0.0, 1.0]]])
    out3 = probability_shift(logits3, torch.tensor([[0, -100]]))  # -100: ignored token
    assert torch.equal(out3, torch.tensor([[[5.0, 1.0, 3.0], [4.0, 0.0, 1.0]]]))


@pytest.mark.parametrize("seed", range(5))
def test_matches_textbrewer_2d(seed):
    gen = generator(seed)
    logits = randn(gen, 6, 5)
    labels = torch.randint(5, (6,), generator=gen)
    out = call_and_check_untouched(probability_shift, logits, labels)
    expected = probability_shift_(logits.clone(), labels.clone())
    assert torch.equal(out, expected)
    assert (out.argmax(-1) == labels).all()
    assert torch.equal(out.sort(-1).values, logits.sort(-1).values)  # a permutation per row


@pytest.mark.parametrize("seed", range(5))
def test_matches_textbrewer_3d_with_ignored_labels(seed):
    gen = generator(seed)
    logits = randn(gen, 3, 4, 5)
    labels = torch.randint(5, (3, 4), generator=gen)
    labels[torch.rand(3, 4, generator=gen) < 0.3] = -100
    labels[0, 0] = -100
    out = call_and_check_untouched(probability_shift, logits, labels)
    expected = probability_shift_(logits.clone(), labels.clone())
    assert torch.equal(out, expected)
    ignored = labels < 0
    assert torch.equal(out[ignored], logits[ignored])
    assert (out.argmax(-1)[~ignored] == labels[~ignored]).all()


def test_result_is_a_new_tensor_with_gradient():
    logits = torch.randn(2, 3, requires_grad=True)
    out = probability_shift(logits, torch.tensor([0, 1]))
    assert out.data_ptr() != logits.data_ptr()
    out.sum().backward()
    assert torch.equal(logits.grad, torch.ones(2, 3))


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (torch.randn(5), torch.tensor(0), "2-d or 3-d"),
        (torch.randn(2, 3), torch.tensor([0, 1, 2]), "labels"),
        (torch.randn(2, 4, 3), torch.zeros(2, dtype=torch.long), "labels"),
    ],
)
def test_bad_shapes_raise(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        probability_shift(logits, labels)


def test_compiles_without_graph_breaks_and_matches_eager():
    gen = generator(9)
    logits2, labels2 = randn(gen, 3, 4), torch.randint(4, (3,), generator=gen)
    logits3, labels3 = randn(gen, 2, 3, 4), torch.randint(4, (2, 3), generator=gen)
    labels3[0, 1] = -100
    calls = [(logits2, labels2), (logits3, labels3)]
    for call in calls:
        assert count_graph_breaks(probability_shift, *call) == 0
    compiled, eager = compiled_and_eager(probability_shift, calls)
    assert_all_close(compiled, eager, atol=0, rtol=0)
