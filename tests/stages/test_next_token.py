"""``next_token``: shifted labels and the row mask of a causal LM."""

from __future__ import annotations

import pytest
import torch

from purekd.stages import next_token, normalise, shift_left


def test_labels_shift_left_and_ignored_positions_are_masked():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [1, 2, 3, -100, -100]])
    out = next_token(labels)
    assert torch.equal(out.labels, torch.tensor([[-100, 5, 6, 7, -100], [2, 3, -100, -100, -100]]))
    assert torch.equal(out.mask, torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]]))
    assert out.mask.dtype == torch.int64
    assert labels[0, 0] == -100 and labels[1, 0] == 1  # input untouched


def test_the_padding_mask_removes_padded_positions_and_their_predictions():
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])  # padding not marked -100
    attention = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0]])  # sample 1 padded on both sides
    out = next_token(labels, attention)
    assert torch.equal(out.mask, torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0]]))


def test_only_a_padding_mask():
    out = next_token(attention_mask=torch.tensor([[1, 1, 1, 0]]))
    assert out.labels is None
    assert torch.equal(out.mask, torch.tensor([[1, 1, 0, 0]]))


def test_kept_rows_equal_the_sliced_form():
    """Loss over kept rows == logits[:, :-1] against labels[:, 1:] without the ignored ones."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 4, generator=gen)
    labels = torch.randint(0, 4, (2, 6), generator=gen)
    labels[0, :2] = -100
    out = next_token(labels)
    keep = out.mask.bool()
    sliced_keep = labels[:, 1:] != -100
    assert torch.equal(logits[keep], logits[:, :-1][sliced_keep])
    assert torch.equal(out.labels[keep], labels[:, 1:][sliced_keep])


def test_shift_left():
    assert torch.equal(shift_left(torch.tensor([[1, 2, 3]]), 0), torch.tensor([[2, 3, 0]]))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({}, ValueError, "neither"),
    ({"labels": torch.zeros(3, dtype=torch.long)}, ValueError, r"\(batch, length\)"),
    ({"labels": torch.zeros(2, 3)}, TypeError, "integer"),
    ({"labels": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)},
     ValueError, "same shape"),
])
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        next_token(**kwargs)


def test_language_model_adaptor_keys():
    h, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    adapted = normalise({"lm_hidden": h, "lm_weight": w, "logits_mask": torch.ones(2, 3),
                         "labels": torch.zeros(2, 3, dtype=torch.long)})
    assert adapted.lm_hidden is h and adapted.lm_weight is w and adapted.logits == ()
    cache = normalise({"topk_ids": torch.zeros(2, 3, 2, dtype=torch.long),
                       "topk_logprobs": torch.zeros(2, 3, 2), "topk_mask": torch.ones(2, 3)})
    assert cache.topk_ids is not None and cache.row_outputs == 1
    with pytest.raises(ValueError, match="'lm_hidden' without 'lm_weight'"):
        normalise({"lm_hidden": h})
    with pytest.raises(ValueError, match="'topk_logprobs' without 'topk_ids'"):
        normalise({"topk_logprobs": torch.zeros(2, 3, 2)})
    with pytest.raises(ValueError, match="only one of them"):
        normalise({"logits": torch.randn(2, 3, 5), "lm_hidden": h, "lm_weight": w})
    with pytest.raises(TypeError, match="expected one tensor"):
        normalise({"lm_hidden": [h], "lm_weight": w})


def test_several_teachers_must_return_logits():
    from purekd.stages import mean_logits
    fused = normalise({"lm_hidden": torch.randn(2, 3, 4), "lm_weight": torch.randn(5, 4)})
    with pytest.raises(ValueError, match="teacher 1's adaptor returned 'lm_hidden'"):
        mean_logits([normalise({"logits": torch.randn(2, 3, 5)}), fused])


def test_masks_that_keep_the_same_rows_are_shared():
    from purekd.stages import share_equal_masks
    m_S = torch.tensor([[1, 1, 0]])
    s = normalise({"logits": torch.randn(1, 3, 4), "logits_mask": m_S})
    same = normalise({"logits": torch.randn(1, 3, 4), "logits_mask": torch.tensor([[1.0, 1.0, 0.0]])})
    other = normalise({"logits": torch.randn(1, 3, 4), "logits_mask": torch.tensor([[0, 1, 1]])})
    assert share_equal_masks(s, same).logits_mask[0] is m_S  # one mask: no pairing, no copy
    assert share_equal_masks(s, other) is other  # different rows: each side keeps its own
