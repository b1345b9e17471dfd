"""``vocabulary_map``: the token strings a student's and a teacher's vocabularies share.

Tokenizers spell the same text differently in their vocabularies, so token strings are first
*normalised* to the bytes they stand for, by the vocabulary's scheme:

==================  ==============================================  =========================
scheme              spelling                                        normalised
==================  ==============================================  =========================
``"byte_level"``    GPT-2 byte-to-unicode (``Ġworld``, ``Ċ``,       each character's byte:
                    ``âĤ¬`` for ``€``)                                ``b" world"``, ``b"\\n"``
``"sentencepiece"`` ``▁`` for a space; byte fallback ``<0xE2>``     ``b" world"``; ``b"\\xe2"``
``"wordpiece"``     ``##`` continues a word; other tokens start     ``b"ing"``; ``b" world"``
                    one (after a space in running text)
``"plain"``         the text itself                                 its UTF-8 bytes
==================  ==============================================  =========================

Special tokens (``<bos>``, ``[CLS]``, ``<|endoftext|>``) are not text: they match only a special
token of the other side with the same string — except the two end-of-text tokens (each
tokenizer's ``eos_token``), which match each other whatever their strings. Within one vocabulary two tokens can normalise to
the same bytes (``A`` and the byte-fallback ``<0x41>``): the ordinary token is kept, then the
lowest id. The matched pairs are one to one.

A map is built once per pair of vocabularies and cached in memory (and on disk with
``cache_dir``), keyed by a fingerprint of both vocabularies (tokens, ids, schemes, specials).
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from purekd._atomic import atomic_write
from purekd.losses import VocabularyMap

SCHEMES = ("byte_level", "sentencepiece", "wordpiece", "plain")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode``, inverted: printable bytes stand for themselves, the others
    for the characters from U+0100 on."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def normalise_token(token: str, scheme: str) -> bytes:
    """The bytes ``token`` stands for in a vocabulary of ``scheme`` (module docstring).

    >>> normalise_token("Ġworld", "byte_level"), normalise_token("▁world", "sentencepiece")
    (b' world', b' world')
    >>> normalise_token("<0xE2>", "sentencepiece"), normalise_token("##ing", "wordpiece")
    (b'\\xe2', b'ing')
    """
    if scheme == "byte_level":
        table = _byte_of_char()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
        return token.encode()  # an added token written as plain text
    if scheme == "sentencepiece":
        fallback = _BYTE_FALLBACK.fullmatch(token)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        return token.replace("▁", " ").encode()
    if scheme == "wordpiece":
        return token[2:].encode() if token.startswith("##") else b" " + token.encode()
    if scheme == "plain":
        return token.encode()
    raise ValueError(f"unknown tokenizer scheme {scheme!r}; choose one of {list(SCHEMES)}")


END_OF_TEXT = ("end", b"")
"""The key of a vocabulary's end-of-text token: the two sides' match each other, whatever their
strings (``<|endoftext|>``, ``<eos>``, ``</s>``)."""


def _keys(vocab: Mapping[str, int], scheme: str, special: Iterable[str],
          end: str | None = None) -> dict[tuple[str, bytes], int]:
    specials = set(special)
    best: dict[tuple[str, bytes], tuple[bool, int]] = {}
    for token, index in vocab.items():
        if token == end:
            key, fallback = END_OF_TEXT, False
        elif token in specials:
            key = ("special", token.encode())
            fallback = False
        else:
            key = ("text", normalise_token(token, scheme))
            fallback = scheme == "sentencepiece" and bool(_BYTE_FALLBACK.fullmatch(token))
        rank = (fallback, int(index))
        if key not in best or rank < best[key]:
            best[key] = rank
    return {key: index for key, (_, index) in best.items()}


def fingerprint(vocab_S: Mapping[str, int], vocab_T: Mapping[str, int], scheme_S: str,
                scheme_T: str, special_S: Iterable[str] = (), special_T: Iterable[str] = (),
                end_S: str | None = None, end_T: str | None = None) -> str:
    """A SHA-256 digest of both vocabularies, their schemes, special tokens and end-of-text
    tokens (when both are given)."""
    digest = hashlib.sha256()
    if end_S is not None and end_T is not None:
        digest.update(json.dumps(["end of text", end_S, end_T]).encode("utf-8",
                                                                        "surrogatepass"))
    for vocab, scheme, special in ((vocab_S, scheme_S, special_S), (vocab_T, scheme_T,
                                                                    special_T)):
        ordered = sorted(vocab.items(), key=operator.itemgetter(1))  # ids are unique
        digest.update(json.dumps([scheme, sorted(special), len(ordered)]).encode())
        digest.update("\x00".join(f"{index}\x01{token}" for token, index in ordered)
                      .encode("utf-8", "surrogatepass"))
        digest.update(b"\x02")
    return digest.hexdigest()


_CACHE: dict[str, VocabularyMap] = {}


def match_vocabularies(vocab_S: Mapping[str, int], vocab_T: Mapping[str, int], *,
                       scheme_S: str, scheme_T: str, special_S: Iterable[str] = (),
                       special_T: Iterable[str] = (), end_S: str | None = None,
                       end_T: str | None = None,
                       cache_dir: str | Path | None = None) -> VocabularyMap:
    """The :class:`~purekd.losses.VocabularyMap` of two vocabularies ``{token: id}``.

    ``scheme_*``: how each spells its tokens (one of :data:`SCHEMES`); ``special_*``: its
    special tokens; ``end_S`` / ``end_T``: each one's end-of-text token (e.g. its
    ``eos_token``): when both are given (and in their vocabularies) they are matched to each
    other, whatever their strings — the end of the text is the same event for both models (what
    an on-policy rollout's end-of-text span compares, docs/cross-tokenizer.md). Pairs are sorted
    by teacher id. Cached by :func:`fingerprint` in memory,
    and as ``cache_dir/vocabulary-map-<fingerprint>.pt`` when ``cache_dir`` is given.

    >>> match_vocabularies({"Ġa": 0, "b": 1}, {"▁a": 5, "c": 6}, scheme_S="byte_level",
    ...                    scheme_T="sentencepiece").matched_T.tolist()
    [5]
    """
    for name, scheme in (("scheme_S", scheme_S), ("scheme_T", scheme_T)):
        if scheme not in SCHEMES:
            raise ValueError(f"match_vocabularies: {name}={scheme!r}; choose one of "
                             f"{list(SCHEMES)}")
    special_S, special_T = tuple(special_S), tuple(special_T)
    if end_S is None or end_T is None or end_S not in vocab_S or end_T not in vocab_T:
        end_S = end_T = None  # one side without: nothing to pair
    key = fingerprint(vocab_S, vocab_T, scheme_S, scheme_T, special_S, special_T, end_S, end_T)
    if key in _CACHE:
        return _CACHE[key]
    path = Path(cache_dir) / f"vocabulary-map-{key}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        stored = torch.load(path, weights_only=True)
        result = VocabularyMap(stored["matched_S"], stored["matched_T"], key)
    else:
        keys_S = _keys(vocab_S, scheme_S, special_S, end_S)
        keys_T = _keys(vocab_T, scheme_T, special_T, end_T)
        pairs = sorted((index_T, keys_S[k]) for k, index_T in keys_T.items() if k in keys_S)
        matched_T = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
        matched_S = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
        result = VocabularyMap(matched_S, matched_T, key)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: torch.save({"matched_S": matched_S,
                                                     "matched_T": matched_T}, f))
    _CACHE[key] = result
    return result


def tokenizer_scheme(tokenizer: Any) -> str:
    """The spelling scheme of a ``transformers`` fast tokenizer, from its decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer (no "
                        f"backend_tokenizer): load it with AutoTokenizer.from_pretrained(..., "
                        f"use_fast=True)")
    decoder = repr(backend.decoder)  # e.g. Sequence(decoders=[Replace(...), ByteFallback()])
    if "ByteLevel" in decoder:
        return "byte_level"
    if "WordPiece" in decoder:
        return "wordpiece"
    if "Metaspace" in decoder or "▁" in decoder or "ByteFallback" in decoder:
        return "sentencepiece"
    return "plain"


def special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens (its ``all_special_tokens`` and special added tokens)."""
    found = set(getattr(tokenizer, "all_special_tokens", ()))
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            found.add(str(added))
    return sorted(found)


def vocabulary_map(tokenizer_S: Any, tokenizer_T: Any, *,
                   cache_dir: str | Path | None = None) -> VocabularyMap:
    """:func:`match_vocabularies` of two ``transformers`` fast tokenizers (the student's, then
    the teacher's): their ``get_vocab()``, schemes (:func:`tokenizer_scheme`), special
    tokens, and end-of-text tokens: their ``eos_token`` s, matched to each other when both
    have one (set ``tokenizer.eos_token`` first to pair other stop tokens, e.g. a chat
    format's ``<end_of_turn>``)."""
    return match_vocabularies(
        tokenizer_S.get_vocab(), tokenizer_T.get_vocab(),
        scheme_S=tokenizer_scheme(tokenizer_S), scheme_T=tokenizer_scheme(tokenizer_T),
        special_S=special_tokens(tokenizer_S), special_T=special_tokens(tokenizer_T),
        end_S=getattr(tokenizer_S, "eos_token", None), end_T=getattr(tokenizer_T, "eos_token",
                                                                      None),
        cache_dir=cache_dir)


__all__ = ["SCHEMES", "fingerprint", "match_vocabularies", "normalise_token", "special_tokens",
           "tokenizer_scheme", "vocabulary_map"]
