"""align_spans / token_spans against hand-worked tokenisations."""

from __future__ import annotations

import warnings

import pytest
import torch

from purekd.losses import AlignedSpans
from purekd.stages import align_spans, batches_without_spans, token_spans


def spans(offsets_S, offsets_T, text=None):
    return [(list(s), list(t)) for s, t in token_spans(offsets_S, offsets_T, text)]


# --------------------------------------------------------------------------- token_spans
def test_leading_space_conventions_agree():
    # "Hello world": GPT-2 byte-level "Hello" "Ġworld"; SentencePiece "▁Hel" "lo" "▁world"
    text = "Hello world"
    byte_level = [(0, 5), (5, 11)]
    sentencepiece = [(0, 3), (3, 5), (5, 11)]
    assert spans(byte_level, sentencepiece, text) == [([0], [0, 1]), ([1], [2])]
    assert spans(byte_level, sentencepiece) == [([0], [0, 1]), ([1], [2])]


def test_wordpiece_gaps_agree_with_leading_space_tokens():
    # WordPiece leaves the space uncovered: "hello" (0,5) "world" (6,11); "##" continuations
    # are adjacent: "un" "##aff" "##able"
    assert spans([(0, 5), (6, 11)], [(0, 5), (5, 11)]) == [([0], [0]), ([1], [1])]
    assert spans([(0, 2), (2, 5), (5, 9)], [(0, 5), (5, 9)]) == [([0, 1], [0]), ([2], [1])]


def test_trailing_space_convention_needs_the_text():
    # "hello world": one side attaches the space to the previous token, the other to the next
    text = "hello world"
    trailing, leading = [(0, 6), (6, 11)], [(0, 5), (5, 11)]
    assert spans(trailing, leading, text) == [([0], [0]), ([1], [1])]
    # without the text the cuts (6 and 5) never meet: one span covers everything
    assert spans(trailing, leading) == [([0, 1], [0, 1])]


def test_token_crossing_a_word_boundary_merges_the_words():
    # "New York is": one side has the token "New York", the other "New" "▁York"
    text = "New York is"
    assert spans([(0, 8), (8, 11)], [(0, 3), (3, 8), (8, 11)], text) == [([0], [0, 1]),
                                                                          ([1], [2])]
    # "ab cd": "ab c" "d" against "ab" " cd": no inner cut agrees, one span of both words
    assert spans([(0, 4), (4, 5)], [(0, 2), (2, 5)], "ab cd") == [([0, 1], [0, 1])]


def test_byte_fallback_tokens_of_one_character_stay_together():
    # "€5": byte-level has the character as one token; SentencePiece's byte fallback spells it
    # <0xE2><0x82><0xAC>, three tokens that all carry the character's offsets (0, 1)
    assert spans([(0, 1), (1, 2)], [(0, 1), (0, 1), (0, 1), (1, 2)], "€5") == [
        ([0], [0, 1, 2]), ([1], [3])]
    # an emoji split into two byte-level tokens on both sides, differently: "😀!" → no cut
    # inside the character on either side
    assert spans([(0, 1), (0, 1), (1, 2)], [(0, 1), (0, 2)], "😀!") == [([0, 1, 2], [0, 1])]


def test_multibyte_characters_use_character_offsets():
    # "naïve café": the offsets are characters (ï and é one each), as fast tokenizers give
    text = "naïve café"
    assert spans([(0, 5), (5, 10)], [(0, 2), (2, 5), (5, 9), (9, 10)], text) == [
        ([0], [0, 1]), ([1], [2, 3])]


def test_zero_width_special_tokens_are_not_text_but_stay_inside_a_span():
    # BOS (0,0) first, EOS (11,11) last: neither is text, and neither forms a span
    assert spans([(0, 0), (0, 5), (5, 11), (11, 11)], [(0, 5), (5, 11)]) == [([1], [0]),
                                                                              ([2], [1])]
    # a zero-width marker between two tokens of one span belongs to it
    assert spans([(0, 2), (2, 2), (2, 5)], [(0, 5)]) == [([0, 1, 2], [0])]


def test_text_beyond_the_shorter_side_is_in_no_span():
    # the teacher was truncated after "Hello": "world" has no partner
    assert spans([(0, 5), (5, 11)], [(0, 5)], "Hello world") == [([0], [0])]
    # a first cut that disagrees (one side starts mid-text) drops the text before agreement
    assert spans([(0, 5), (5, 11)], [(3, 5), (5, 11)], "Hello world") == [([1], [1])]
    assert spans([], [(0, 5)]) == []


def test_tensor_offsets_are_accepted():
    assert spans(torch.tensor([[0, 5], [5, 11]]), torch.tensor([[0, 11]])) == [([0, 1], [0])]


# --------------------------------------------------------------------------- align_spans
def test_align_spans_rows_ids_masks_and_padding():
    # two sequences; student rows flatten (2, 4), teacher (2, 5); shift=1: row = position - 1
    ids_S = [[100, 11, 12, 0], [100, 13, 14, 15]]
    off_S = [[(0, 0), (0, 5), (5, 11), (0, 0)], [(0, 0), (0, 2), (2, 3), (3, 5)]]
    ids_T = [[200, 21, 22, 23, 0], [200, 24, 25, 0, 0]]
    off_T = [[(0, 0), (0, 3), (3, 5), (5, 11), (0, 0)],
             [(0, 0), (0, 3), (3, 5), (0, 0), (0, 0)]]
    result = align_spans(ids_S, off_S, ids_T, off_T)
    assert isinstance(result, AlignedSpans)
    # sequence 0: S[1] ~ T[1, 2], S[2] ~ T[3]; sequence 1: S[1, 2] ~ T[1], S[3] ~ T[2]
    assert result.rows_S.tolist() == [[0, 0], [1, 0], [4, 5], [6, 0]]
    assert result.ids_S.tolist() == [[11, 0], [12, 0], [13, 14], [15, 0]]
    assert result.mask_S.tolist() == [[True, False], [True, False], [True, True], [True, False]]
    assert result.rows_T.tolist() == [[0, 1], [2, 0], [5, 0], [6, 0]]
    assert result.ids_T.tolist() == [[21, 22], [23, 0], [24, 0], [25, 0]]
    assert result.mask_T.tolist() == [[True, True], [True, False], [True, False], [True, False]]
    assert result.weight.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert result.weight.dtype == torch.float32 and result.rows_S.dtype == torch.int64


def test_align_spans_shift_masks_and_attention():
    ids_S, off_S = [[11, 12, 13]], [[(0, 1), (1, 2), (2, 3)]]
    ids_T, off_T = [[21, 22, 23]], [[(0, 1), (1, 2), (2, 3)]]
    # shift=1: the span at position 0 has no predicting row and is dropped
    assert align_spans(ids_S, off_S, ids_T, off_T).rows_S.tolist() == [[0], [1]]
    # shift=0: row = position
    assert align_spans(ids_S, off_S, ids_T, off_T, shift=0).rows_S.tolist() == [[0], [1], [2]]
    # a masked token (either side) drops its span
    kept = align_spans(ids_S, off_S, ids_T, off_T, mask_T=[[1, 1, 0]])
    assert kept.rows_S.tolist() == [[0]] and kept.ids_T.tolist() == [[22]]
    # an unattended predicting row drops the span it predicts
    kept = align_spans(ids_S, off_S, ids_T, off_T, attended_S=[[0, 1, 1]])
    assert kept.ids_S.tolist() == [[13]]


def test_no_span_gives_one_padding_span_and_a_counted_warning():
    before = batches_without_spans()
    with pytest.warns(RuntimeWarning) as record:
        result = align_spans([[1]], [[(0, 1)]], [[2]], [[(0, 1)]])  # only position 0: no row
    assert batches_without_spans() == before + 1
    assert str(record[0].message) == (
        f"align_spans: no aligned span in this batch of 1 sequence(s) ({before + 1} such "
        f"batch(es) so far): the cross-tokenizer loss is 0 for it. Check that both sides "
        f"tokenised the same texts, that the masks keep some tokens, and that sequences are "
        f"longer than shift=1")
    assert result.weight.tolist() == [0.0]
    assert result.rows_S.shape == (1, 1) and not result.mask_S.any()


def test_align_spans_bad_input():
    with pytest.raises(ValueError, match=r"align_spans: ids_S has 1 sequences, ids_T 2: both "
                                         r"sides must tokenise the same texts"):
        align_spans([[1]], [[(0, 1)]], [[1], [2]], [[(0, 1)], [(0, 1)]])
    with pytest.raises(ValueError, match=r"align_spans: sequence 0: 2 ids_T but 1 offsets_T; "
                                         r"one \(start, end\) per token"):
        align_spans([[1]], [[(0, 1)]], [[1, 2]], [[(0, 1)]])
    with pytest.raises(ValueError, match=r"align_spans: shift=-1 must be an int >= 0"):
        align_spans([[1]], [[(0, 1)]], [[1]], [[(0, 1)]], shift=-1)
    with pytest.raises(ValueError, match=r"align_spans: mask_S must have the shape of its "
                                         r"side's ids"):
        align_spans([[1]], [[(0, 1)]], [[1]], [[(0, 1)]], mask_S=[[1, 1]])


def test_align_spans_device_and_quietness():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = align_spans([[1, 2]], [[(0, 1), (1, 2)]], [[1, 2]], [[(0, 1), (1, 2)]],
                             device="cpu")
    assert all(t.device.type == "cpu" for t in result)
