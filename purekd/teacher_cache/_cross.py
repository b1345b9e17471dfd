"""A cross-tokenizer teacher cache: the teacher's top-k over its **own** tokenisation of each
text, stored with that tokenisation's character offsets, and read back as batches that carry
the aligned spans between the student's tokenisation and the stored teacher's — so that
``kd_loss_type="uld"`` and ``"gold"`` train from the cache without the teacher model (or its
tokenizer).

* writing: :class:`TeacherTextCollate` collates ``WithSampleIds(texts)`` for
  :func:`~purekd.teacher_cache.write_teacher_cache` ``(..., tokenizer=tokenizer_T,
  student_tokenizer=tokenizer_S)``;
* reading: :class:`CrossTokenizerCachedDataset` (texts + the cache, checked: the pair of
  tokenizers, the sample ids, each text's digest) and :class:`CrossTokenizerCachedCollate`
  (the student's batch from its tokenizer, the cached rows padded, the spans).

See docs/cross-tokenizer.md ("From a teacher cache").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from purekd.stages import align_spans, check_offsets_support

from . import _format as fmt
from ._dataset import STUDENT, TEACHER_CACHE, _ids_for, pad_teacher_cache
from ._reader import CachedSample, TeacherCache
from ._writer import OFFSETS, SAMPLE_ID, TEACHER, TEXTS

TEXT, VOCAB_SIZE, SPANS = "text", "vocab_size", "spans"


def _encode(tokenizer: Any, texts: list[str], max_length: int | None) -> dict[str, Tensor]:
    """Each text's ids and offsets, padded on the right (whatever the tokenizer's padding side)
    with its pad id (0 without one); ``attention_mask`` 1 on the tokens."""
    encoded = tokenizer(texts, return_offsets_mapping=True, truncation=max_length is not None,
                        max_length=max_length, add_special_tokens=True)
    length = max((len(ids) for ids in encoded["input_ids"]), default=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(texts), length), pad, dtype=torch.int64)
    mask = torch.zeros(len(texts), length, dtype=torch.int64)
    offsets = torch.zeros(len(texts), length, 2, dtype=torch.int64)
    for row, (tokens, spans) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"],
                                              strict=True)):
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        mask[row, :len(tokens)] = 1
        if tokens:
            offsets[row, :len(tokens)] = torch.tensor(spans, dtype=torch.int64)
    return {"input_ids": ids, "attention_mask": mask, "offset_mapping": offsets}


def _texts(items: Sequence[Any], key: str, where: str) -> list[str]:
    texts = [item.get(key) if isinstance(item, Mapping) else None for item in items]
    if not all(isinstance(t, str) for t in texts):
        raise TypeError(f"{where}: each item must be a dict whose {key!r} is the text (a str)")
    return [str(t) for t in texts]


class TeacherTextCollate:
    """Collate ``WithSampleIds(texts)`` items for a cross-tokenizer cache writer:
    ``{'sample_id': (B,), 'teacher': {'input_ids', 'attention_mask'} (B, L_T), 'offsets'
    (B, L_T, 2), 'texts': [str]}`` — the teacher's tokenisation (fast tokenizer, right padding,
    truncated to ``max_length`` tokens when given) and each token's character offsets."""

    def __init__(self, tokenizer_T: Any, *, max_length: int | None = None) -> None:
        check_offsets_support(tokenizer_T, "teacher")
        self.tokenizer_T, self.max_length = tokenizer_T, max_length

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        texts = _texts(items, TEACHER, "TeacherTextCollate")
        encoded = _encode(self.tokenizer_T, texts, self.max_length)
        offsets = encoded.pop("offset_mapping")
        return {SAMPLE_ID: torch.tensor([int(item[SAMPLE_ID]) for item in items]),
                TEACHER: encoded, OFFSETS: offsets, TEXTS: texts}


class CrossTokenizerCachedDataset(Dataset):
    """``texts`` with a cross-tokenizer cache: item ``i`` is ``{'text': texts[i],
    'teacher_cache': CachedSample, 'vocab_size': V_T}``; batch it with
    :class:`CrossTokenizerCachedCollate`.

    Checked at construction, before any training: the cache is a cross-tokenizer cache written
    for ``tokenizer_S`` (its fingerprint; ``tokenizer_T``, when given, for the teacher's), every
    id (``sample_ids``, default the index) is in it, and every text's digest is the one stored
    (another text under the same id is a ``ValueError`` naming the item).
    """

    def __init__(self, texts: Sequence[str], cache: TeacherCache, tokenizer_S: Any, *,
                 tokenizer_T: Any = None, sample_ids: Sequence[int] | None = None) -> None:
        if not isinstance(cache, TeacherCache):
            raise TypeError(f"cache: expected a TeacherCache, got {type(cache).__name__}")
        if not cache.cross_tokenizer:
            raise fmt.CacheError(
                f"the cache at {cache.path} is not a cross-tokenizer cache (it holds no teacher "
                "offsets): write one with write_teacher_cache(..., tokenizer=tokenizer_T, "
                "student_tokenizer=tokenizer_S), or read this one with CachedTeacherDataset")
        cache.check_tokenizers(tokenizer_S=tokenizer_S, tokenizer_T=tokenizer_T)
        self.texts, self.cache = list(texts), cache
        if not all(isinstance(t, str) for t in self.texts):
            raise TypeError("CrossTokenizerCachedDataset: texts must be strings")
        self.ids = _ids_for(self.texts, sample_ids)
        cache.require(self.ids)
        for index in range(len(self.ids)):
            self._checked(index)

    def __len__(self) -> int:
        return len(self.ids)

    def _checked(self, index: int) -> CachedSample:
        sample_id = int(self.ids[index])
        cached = self.cache[sample_id]
        text = self.texts[index]
        if cached.text_digest is not None and cached.text_digest != fmt.text_digest(text):
            raise ValueError(
                f"item {index} (sample id {sample_id}) is not the text the cache was written "
                f"for (its digest differs): {text[:60]!r}…; the same ids name other texts — "
                "give the texts in the writer's order (or the writer's sample_ids)")
        return cached

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {TEXT: self.texts[index], TEACHER_CACHE: self._checked(index),
                VOCAB_SIZE: self.cache.vocab_size}


class CrossTokenizerCachedCollate:
    """Collate :class:`CrossTokenizerCachedDataset` items into ``{'student': batch_S,
    'teacher': batch_S, 'teacher_cache': {...}, 'spans': AlignedSpans}``.

    ``batch_S``: the student's tokenisation of the texts (``input_ids``, ``attention_mask``,
    ``labels`` with padding as ``-100``; right padding, ``max_length`` tokens when given).
    ``teacher_cache``: the cached rows padded to the longest (``L_T``) — ``topk_ids``,
    ``topk_logprobs`` ``(B, L_T, k)``, ``topk_mask`` ``(B, L_T)``, ``topk_next_logprobs``
    ``(B, L_T)`` and ``topk_vocab_size`` (an int) — what a teacher adaptor ``lambda batch,
    cached: dict(cached)`` passes on. ``spans``: :func:`~purekd.stages.align_spans` of the
    student's tokens and the stored teacher tokens and offsets (``shift=1``), exactly the spans
    :class:`~purekd.stages.CrossTokenizerCollator` builds from both tokenizers.
    """

    def __init__(self, tokenizer_S: Any, *, max_length: int | None = None) -> None:
        check_offsets_support(tokenizer_S, "student")
        self.tokenizer_S, self.max_length = tokenizer_S, max_length

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        texts = _texts(items, TEXT, "CrossTokenizerCachedCollate")
        cached: list[CachedSample] = [item[TEACHER_CACHE] for item in items]
        if any(c.offsets is None or c.tokens is None or c.next_logprobs is None
               for c in cached):
            raise TypeError("CrossTokenizerCachedCollate collates items of "
                            "CrossTokenizerCachedDataset (a cross-tokenizer cache)")
        student = _encode(self.tokenizer_S, texts, self.max_length)
        offsets_S = student.pop("offset_mapping")
        student["labels"] = student["input_ids"].masked_fill(student["attention_mask"] == 0, -100)
        teacher_cache: dict[str, Any] = pad_teacher_cache(cached)
        length = teacher_cache["topk_mask"].shape[1]
        tokens_T = torch.zeros(len(items), length, dtype=torch.int64)
        offsets_T = torch.zeros(len(items), length, 2, dtype=torch.int64)
        following = torch.zeros(len(items), length, dtype=torch.float32)
        for row, sample in enumerate(cached):
            n = len(sample.topk_ids)
            assert sample.tokens is not None and sample.offsets is not None
            assert sample.next_logprobs is not None
            tokens_T[row, :n], offsets_T[row, :n] = sample.tokens, sample.offsets
            following[row, :n] = sample.next_logprobs
        teacher_cache["topk_next_logprobs"] = following
        teacher_cache["topk_vocab_size"] = int(items[0][VOCAB_SIZE])
        mask_T = teacher_cache["topk_mask"]
        spans = align_spans(student["input_ids"], offsets_S, tokens_T, offsets_T,
                            mask_S=student["labels"] != -100, mask_T=mask_T,
                            attended_S=student["attention_mask"], attended_T=mask_T,
                            texts=texts, shift=1)
        return {STUDENT: student, TEACHER: student, TEACHER_CACHE: teacher_cache, SPANS: spans}


__all__ = ["CrossTokenizerCachedCollate", "CrossTokenizerCachedDataset", "TeacherTextCollate"]
