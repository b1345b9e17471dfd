"""A data set that yields the student's batch with the cached teacher's top-k beside it, in the
seed's ``{'student', 'teacher', 'teacher_cache'}`` format, and the collate function that pads
the cached rows to the batch's length."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset, default_collate

from ._reader import CachedSample, TeacherCache
from ._writer import SAMPLE_ID, TEACHER, default_tokens

STUDENT, TEACHER_CACHE = "student", "teacher_cache"


class WithSampleIds(Dataset):
    """``dataset`` whose item ``i`` is ``{'sample_id': id_i, 'teacher': dataset[i]}``, the batch
    format :func:`write_teacher_cache` reads. ``sample_ids`` (a sequence of ints, one per item)
    defaults to the item's index."""

    def __init__(self, dataset: Any, sample_ids: Sequence[int] | None = None):
        self.dataset = dataset
        self.ids = _ids_for(dataset, sample_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {SAMPLE_ID: int(self.ids[index]), TEACHER: self.dataset[index]}


def _ids_for(dataset: Any, sample_ids: Sequence[int] | None) -> np.ndarray:
    size = len(dataset)
    if sample_ids is None:
        return np.arange(size, dtype=np.int64)
    ids = np.asarray(list(sample_ids))
    if ids.shape != (size,) or (size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"sample_ids: expected {size} integers (one per item of the data set), "
                         f"got an array of shape {ids.shape} and dtype {ids.dtype}")
    if len(np.unique(ids)) != size:
        raise ValueError("sample_ids: the ids must be distinct, one per sample")
    return ids.astype(np.int64)


def _item_length(item: Any, tokens: Tensor | None) -> int | None:
    if isinstance(item, Mapping) and isinstance(item.get("attention_mask"), Tensor):
        return int((item["attention_mask"] != 0).sum())
    return None if tokens is None else int(tokens.numel())


class CachedTeacherDataset(Dataset):
    """``dataset`` with the cached teacher: item ``i`` is ``{'student': dataset[i], 'teacher':
    dataset[i], 'teacher_cache': CachedSample}`` (the same object under ``'student'`` and
    ``'teacher'``: the teacher's adaptor sees the student's batch and the cache as outputs).

    ``sample_ids`` gives item ``i``'s id (default: ``i``); ``tokens(item)`` finds an item's token
    ids (default: the tensor, ``'input_ids'`` or first entry). At construction — before any
    training — every id must be in the cache (:class:`MissingSamplesError`), and with
    ``check_lengths`` every item's token count (its ``attention_mask`` sum when it has one) must
    equal the cached length, and its tokens the cached tokens when the cache stored them.
    Batch it with :class:`CachedCollate`.
    """

    def __init__(self, dataset: Any, cache: TeacherCache, *,
                 sample_ids: Sequence[int] | None = None,
                 tokens: Callable[[Any], Tensor | None] = default_tokens,
                 check_lengths: bool = True):
        if not isinstance(cache, TeacherCache):
            raise TypeError(f"cache: expected a TeacherCache, got {type(cache).__name__}")
        self.dataset, self.cache, self.tokens = dataset, cache, tokens
        self.ids = _ids_for(dataset, sample_ids)
        cache.require(self.ids)
        if check_lengths:
            for index in range(len(self.ids)):
                self._checked(index, self.dataset[index])

    def __len__(self) -> int:
        return len(self.ids)

    def _checked(self, index: int, item: Any) -> CachedSample:
        sample_id = int(self.ids[index])
        cached = self.cache[sample_id]
        item_tokens = self.tokens(item)
        if item_tokens is not None:
            item_tokens = item_tokens.reshape(-1)
        length = _item_length(item, item_tokens)
        if length is None:
            raise ValueError(
                f"item {index} (sample id {sample_id}): tokens(item) found no token ids to "
                "check its length against the cache; pass tokens=a function item -> ids (L,)")
        if length != len(cached.topk_ids):
            raise ValueError(
                f"item {index} (sample id {sample_id}) has {length} tokens but the cache holds "
                f"{len(cached.topk_ids)} rows for it: the student's data set is not the one the "
                "cache was written from (other sample ids, tokenizer, truncation or max length)")
        if cached.tokens is not None and item_tokens is not None:
            mine = item_tokens[:length].to(torch.int64).cpu()
            if not torch.equal(mine, cached.tokens):
                at = int((mine != cached.tokens).nonzero()[0, 0])
                raise ValueError(
                    f"item {index} (sample id {sample_id}): token {at} is {int(mine[at])} but "
                    f"the cache was written for token {int(cached.tokens[at])}: the same ids "
                    "name other texts, or another tokenizer was used")
        return cached

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        cached = self._checked(index, item)
        return {STUDENT: item, TEACHER: item, TEACHER_CACHE: cached}


def pad_teacher_cache(samples: Sequence[CachedSample], length: int | None = None) -> dict[str, Tensor]:
    """The batch's ``teacher_cache``: ``{'topk_ids': (B, L, k) int64, 'topk_logprobs': (B, L, k)
    float32, 'topk_mask': (B, L) int64 0/1}``, ``L = length`` (default: the longest sample).

    Rows past a sample's length have mask 0 and hold a harmless finite distribution (ids
    ``0..k-1``, each log-probability ``-log(k + 1)``), so that losses masked by weighting stay
    finite there.
    """
    if not samples:
        raise ValueError("pad_teacher_cache needs at least one sample")
    k = samples[0].topk_ids.shape[-1]
    longest = max(len(s.topk_ids) for s in samples)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a cached sample has {longest} rows but the batch is {length} long: "
                         "pad the student's batch to at least the longest sample")
    ids = torch.arange(k, dtype=torch.int64).expand(len(samples), length, k).clone()
    logprobs = torch.full((len(samples), length, k), -float(np.log(k + 1)), dtype=torch.float32)
    mask = torch.zeros(len(samples), length, dtype=torch.int64)
    for row, sample in enumerate(samples):
        n = len(sample.topk_ids)
        ids[row, :n] = sample.topk_ids
        logprobs[row, :n] = sample.topk_logprobs
        mask[row, :n] = 1
    return {"topk_ids": ids, "topk_logprobs": logprobs, "topk_mask": mask}


class CachedCollate:
    """Collate items of :class:`CachedTeacherDataset`: the students' items with
    ``student_collate`` (default ``torch.utils.data.default_collate``; give one that pads for
    token sequences of different lengths), the cache with :func:`pad_teacher_cache` to the
    student batch's length (``tokens(batch).shape[-1]``; the longest sample when ``tokens``
    finds none).

    The cache's rows are right-aligned (row ``t`` is position ``t`` of the sample), so the
    student's batch must be too: each batch is checked — row ``b`` of the student's
    ``attention_mask`` (when the batch has one) must be ones exactly on the sample's ``n_b``
    cached rows, and ``tokens(batch)[b, :n_b]`` must be the sample's tokens (the cached ones, or
    the item's own). A batch padded on the left (``tokenizer.padding_side = 'left'``) is a
    ``ValueError``: it would be scored against the wrong rows. The check is ``O(B × L)``
    integer comparisons a batch.
    """

    def __init__(self, student_collate: Callable[[list[Any]], Any] | None = None,
                 tokens: Callable[[Any], Tensor | None] = default_tokens):
        self.student_collate = student_collate if student_collate is not None else default_collate
        self.tokens = tokens

    def __call__(self, items: list[Mapping[str, Any]]) -> dict[str, Any]:
        for item in items:
            if not (isinstance(item, Mapping) and isinstance(item.get(TEACHER_CACHE), CachedSample)):
                raise TypeError("CachedCollate collates items of CachedTeacherDataset "
                                "({'student', 'teacher', 'teacher_cache'})")
        student = self.student_collate([item[STUDENT] for item in items])
        tokens = self.tokens(student)
        length = int(tokens.shape[-1]) if tokens is not None and tokens.dim() >= 2 else None
        cached = [item[TEACHER_CACHE] for item in items]
        teacher_cache = pad_teacher_cache(cached, length)
        self._check_alignment(student, tokens, items, teacher_cache["topk_mask"])
        return {STUDENT: student, TEACHER: student, TEACHER_CACHE: teacher_cache}

    def _check_alignment(self, student: Any, tokens: Tensor | None,
                         items: list[Mapping[str, Any]], cached_mask: Tensor) -> None:
        """Refuse a student batch whose samples do not start at position 0 (left padding)."""
        rows, length = cached_mask.shape
        hint = ("the cache's rows are right-aligned (row t is position t of the sample), so a "
                "batch padded on the left would be scored against the wrong rows: pad the "
                "student's batch on the right (tokenizer.padding_side = 'right')")
        mask = student.get("attention_mask") if isinstance(student, Mapping) else None
        if isinstance(mask, Tensor) and tuple(mask.shape) == (rows, length):
            differs = ((mask != 0).cpu() != (cached_mask != 0)).any(-1)
            if bool(differs.any()):
                row = int(differs.nonzero()[0, 0])
                raise ValueError(
                    f"CachedCollate: row {row} of the student's batch has attention_mask "
                    f"{mask[row].int().tolist()} but its sample's {int(cached_mask[row].sum())} "
                    f"cached rows are positions 0..{int(cached_mask[row].sum()) - 1}: the batch "
                    f"looks padded on the left; {hint}")
        if tokens is None or tokens.dim() < 2 or tokens.shape[0] != rows:
            return
        references = []
        for item in items:
            sample: CachedSample = item[TEACHER_CACHE]
            reference = sample.tokens if sample.tokens is not None else self.tokens(item[STUDENT])
            if reference is None:
                return  # nothing to compare with
            references.append(reference.reshape(-1)[:len(sample.topk_ids)].to(torch.int64))
        expected = pad_sequence(references, batch_first=True, padding_value=-1).cpu()
        mine = tokens.reshape(rows, -1)[:, :expected.shape[1]].cpu().to(torch.int64)
        differs = ((mine != expected) & (cached_mask[:, :expected.shape[1]] != 0)).any(-1)
        if bool(differs.any()):
            row = int(differs.nonzero()[0, 0])
            n = len(references[row])
            raise ValueError(
                f"CachedCollate: row {row} of the student's batch does not hold its sample's "
                f"{n} tokens at positions 0..{n - 1} (it has {mine[row, :8].tolist()}…, the "
                f"sample {references[row][:8].tolist()}…): the batch looks padded on the left "
                f"(or its collate changed the tokens); {hint}")


__all__ = ["CachedCollate", "CachedTeacherDataset", "WithSampleIds", "pad_teacher_cache"]
