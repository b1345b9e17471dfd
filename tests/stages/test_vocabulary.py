"""vocabulary_map: normalised token strings, one-to-one matches, specials, the cache."""

from __future__ import annotations

import pytest
import torch

from purekd.losses import VocabularyMap
from purekd.stages import (
    _vocabulary,
    match_vocabularies,
    normalise_token,
    tokenizer_scheme,
    vocabulary_map,
)

from . import _tokenizers


@pytest.mark.parametrize(("token", "scheme", "expected"), [
    ("Ġworld", "byte_level", b" world"),
    ("Ċ", "byte_level", b"\n"),
    ("âĤ¬", "byte_level", "€".encode()),
    ("ðŁĺ", "byte_level", "😀".encode()[:3]),
    ("hello", "byte_level", b"hello"),
    ("<|endoftext|>", "byte_level", b"<|endoftext|>"),
    ("▁world", "sentencepiece", b" world"),
    ("▁", "sentencepiece", b" "),
    ("<0xE2>", "sentencepiece", b"\xe2"),
    ("<0x0A>", "sentencepiece", b"\n"),
    ("naïve", "sentencepiece", "naïve".encode()),
    ("##ing", "wordpiece", b"ing"),
    ("world", "wordpiece", b" world"),
    ("world", "plain", b"world"),
])
def test_normalise_token(token, scheme, expected):
    assert normalise_token(token, scheme) == expected


def test_normalise_token_unknown_scheme():
    with pytest.raises(ValueError, match=r"^unknown tokenizer scheme 'bpe'; choose one of "
                                         r"\['byte_level', 'sentencepiece', 'wordpiece', "
                                         r"'plain'\]$"):
        normalise_token("a", "bpe")


def test_match_vocabularies_by_hand():
    student = {"Ġthe": 0, "the": 1, "âĤ¬": 2, "<|endoftext|>": 3, "Ġcat": 4, "A": 5}
    teacher = {"<bos>": 0, "▁the": 1, "the": 2, "<0xE2>": 3, "€": 4, "<0x41>": 5, "A": 9,
               "▁dog": 7, "<|endoftext|>": 8}
    result = match_vocabularies(student, teacher, scheme_S="byte_level",
                                scheme_T="sentencepiece", special_S=["<|endoftext|>"],
                                special_T=["<bos>"])
    pairs = list(zip(result.matched_T.tolist(), result.matched_S.tolist(), strict=True))
    # ▁the ~ Ġthe, the ~ the, € ~ âĤ¬, and "A" ~ "A" (the ordinary token wins over the
    # byte fallback <0x41>, which normalises to the same byte); <|endoftext|> is special on
    # the student's side and text on the teacher's: no match
    assert pairs == [(1, 0), (2, 1), (4, 2), (9, 5)]
    assert isinstance(result, VocabularyMap) and len(result.fingerprint) == 64
    assert result.matched_S.dtype == torch.int64


def test_specials_match_only_specials_with_the_same_string():
    result = match_vocabularies({"<s>": 0, "a": 1}, {"<s>": 5, "a": 6}, scheme_S="plain",
                                scheme_T="plain", special_S=["<s>"], special_T=["<s>"])
    assert result.matched_T.tolist() == [5, 6] and result.matched_S.tolist() == [0, 1]


def test_cache_in_memory_and_on_disk(tmp_path, monkeypatch):
    student, teacher = {"Ġa": 0, "b": 1}, {"▁a": 0, "b": 3}
    first = match_vocabularies(student, teacher, scheme_S="byte_level", scheme_T="sentencepiece",
                               cache_dir=tmp_path)
    again = match_vocabularies(dict(student), dict(teacher), scheme_S="byte_level",
                               scheme_T="sentencepiece")
    assert again is first  # the same pair of vocabularies: built once
    stored = tmp_path / f"vocabulary-map-{first.fingerprint}.pt"
    assert stored.exists()
    # a fresh process (empty memory cache) reads the file instead of matching again
    monkeypatch.setattr(_vocabulary, "_CACHE", {})
    monkeypatch.setattr(_vocabulary, "_keys", lambda *a: pytest.fail("matched again"))
    loaded = match_vocabularies(student, teacher, scheme_S="byte_level",
                                scheme_T="sentencepiece", cache_dir=tmp_path)
    assert torch.equal(loaded.matched_S, first.matched_S)
    assert torch.equal(loaded.matched_T, first.matched_T)
    # another vocabulary: another fingerprint
    other = _vocabulary.fingerprint({"Ġa": 0, "c": 1}, teacher, "byte_level", "sentencepiece")
    assert other != first.fingerprint


def test_bad_scheme():
    with pytest.raises(ValueError, match=r"^match_vocabularies: scheme_T='spm'; choose one of"):
        match_vocabularies({}, {}, scheme_S="plain", scheme_T="spm")


def test_wordpiece_tokenizer_scheme_and_map():
    tokenizer = _tokenizers.wordpiece()
    assert tokenizer_scheme(tokenizer) == "wordpiece"
    result = vocabulary_map(tokenizer, tokenizer)
    assert result.matched_S.tolist() == result.matched_T.tolist() == list(range(len(tokenizer)))


def test_slow_tokenizer_has_no_scheme(tmp_path):
    with pytest.raises(TypeError, match=r"^BertTokenizerLegacy is not a fast tokenizer"):
        tokenizer_scheme(_tokenizers.slow_wordpiece(tmp_path))


def test_real_pair_smollm2_gemma3():
    smollm2, gemma3 = _tokenizers.smollm2(), _tokenizers.gemma3()
    assert tokenizer_scheme(smollm2) == "byte_level"
    assert tokenizer_scheme(gemma3) == "sentencepiece"
    result = vocabulary_map(smollm2, gemma3)
    vocab_S, vocab_T = smollm2.get_vocab(), gemma3.get_vocab()
    # the spellings differ ("Ġthe" / "▁the") but the normalised strings match
    assert vocab_T["▁the"] in result.matched_T.tolist()
    index = result.matched_T.tolist().index(vocab_T["▁the"])
    assert result.matched_S[index].item() == vocab_S["Ġthe"]
    # most of the smaller vocabulary is matched; the pairs are one to one
    assert result.matched_S.numel() > 0.8 * len(vocab_S)
    assert result.matched_S.unique().numel() == result.matched_S.numel()
    assert result.matched_T.unique().numel() == result.matched_T.numel()
    assert vocabulary_map(smollm2, gemma3) is result  # cached
