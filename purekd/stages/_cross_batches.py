"""The two models' batches of one text, tokenised by each model's own tokenizer, and their spans.

purekd feeds different batches to the teacher and the student with a dict ``{'teacher': ...,
'student': ...}`` (:func:`~purekd.stages.batch_split`). With two tokenizers, each side's batch is
its own tokenisation of the same texts; :class:`CrossTokenizerCollator` builds both from raw text
and adds their :class:`~purekd.losses.AlignedSpans` under ``'spans'``; :func:`align_batches`
aligns two batches tokenised elsewhere (e.g. a student's samples re-tokenised for the teacher),
after checking on a sample that they hold the same text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from purekd.losses import AlignedSpans

from ._align import align_spans

STUDENT_KEY, TEACHER_KEY, SPANS_KEY = "student", "teacher", "spans"


def _describe(tokenizer: Any) -> str:
    name = getattr(tokenizer, "name_or_path", "") or ""
    return f"{type(tokenizer).__name__}" + (f" ({name!r})" if name else "")


def check_offsets_support(tokenizer: Any, side: str) -> None:
    """A ``ValueError`` naming the tokenizer when it cannot give character offsets."""
    if not getattr(tokenizer, "is_fast", False):
        name = getattr(tokenizer, "name_or_path", "") or "..."
        raise ValueError(
            f"the {side} tokenizer {_describe(tokenizer)} gives no offset mapping (it is a slow, "
            f"Python tokenizer), and cross-tokenizer alignment needs each token's character "
            f"offsets: load the fast tokenizer instead, AutoTokenizer.from_pretrained({name!r}, "
            f"use_fast=True) (it needs the `tokenizers` package)")


def _same_text(a: str, b: str) -> bool:
    """Equal up to whitespace and case (uncased tokenizers lower-case; some decoders join tokens
    with spaces), the shorter a prefix of the longer (either side may be truncated)."""
    a, b = "".join(a.split()).casefold(), "".join(b.split()).casefold()
    return a.startswith(b) or b.startswith(a)


def check_same_texts(ids_S: Tensor, tokenizer_S: Any, ids_T: Tensor, tokenizer_T: Any, *,
                     sample: int = 2) -> None:
    """Decode the first ``sample`` sequences of both sides and raise a ``ValueError`` naming the
    first that differs (up to whitespace, case and truncation), with both texts."""
    if ids_S.size(0) != ids_T.size(0):
        raise ValueError(f"the student's batch has {ids_S.size(0)} sequences and the teacher's "
                         f"{ids_T.size(0)}: each side must tokenise the same texts")
    for b in range(min(sample, ids_S.size(0))):
        text_S = tokenizer_S.decode(ids_S[b].tolist(), skip_special_tokens=True)
        text_T = tokenizer_T.decode(ids_T[b].tolist(), skip_special_tokens=True)
        if not _same_text(text_S, text_T):
            raise ValueError(
                f"sequence {b} holds different texts in the student's and the teacher's batch: "
                f"student {text_S[:80]!r}, teacher {text_T[:80]!r}. Cross-tokenizer "
                f"distillation needs each side's tokenisation of the same text: build both "
                f"from the raw texts (CrossTokenizerCollator), or re-tokenise the decoded "
                f"student text for the teacher")


def _token_mask(batch: Mapping[str, Any], ignore_index: int) -> Any:
    labels = batch.get("labels")
    if labels is not None:
        return labels != ignore_index
    return batch.get("attention_mask")


def align_batches(batch_S: Mapping[str, Any], batch_T: Mapping[str, Any], *, tokenizer_S: Any,
                  tokenizer_T: Any, texts: Sequence[str] | None = None, shift: int = 1,
                  sample: int = 2, ignore_index: int = -100) -> AlignedSpans:
    """The aligned spans of two batches of the same texts, each from its own tokenizer.

    ``batch_*``: mappings with ``input_ids`` ``(B, L)``, ``offset_mapping`` ``(B, L, 2)``
    (``return_offsets_mapping=True``), optionally ``attention_mask`` and ``labels`` (a token
    takes part when its label is not ``ignore_index``, else when attended). The texts are
    compared on the first ``sample`` sequences (decoded) unless ``texts`` is given.
    """
    for side, batch, tokenizer in (("student", batch_S, tokenizer_S),
                                   ("teacher", batch_T, tokenizer_T)):
        if "offset_mapping" not in batch:
            raise ValueError(
                f"the {side}'s batch has no 'offset_mapping': call its tokenizer, "
                f"{_describe(tokenizer)}, with return_offsets_mapping=True (a fast tokenizer "
                f"gives each token's character offsets)")
    if texts is None:
        check_same_texts(batch_S["input_ids"], tokenizer_S, batch_T["input_ids"], tokenizer_T,
                         sample=sample)
    return align_spans(batch_S["input_ids"], batch_S["offset_mapping"], batch_T["input_ids"],
                       batch_T["offset_mapping"], mask_S=_token_mask(batch_S, ignore_index),
                       mask_T=_token_mask(batch_T, ignore_index),
                       attended_S=batch_S.get("attention_mask"),
                       attended_T=batch_T.get("attention_mask"), texts=texts, shift=shift)


class CrossTokenizerCollator:
    """Texts → ``{'student': batch_S, 'teacher': batch_T, 'spans': AlignedSpans}``.

    Each side's batch is its tokenizer's output for the same texts (``input_ids``,
    ``attention_mask``, ``labels`` = the ids with padding as ``-100``; right-padded to the longest
    whatever the tokenizer's ``padding_side``,
    truncated to ``max_length`` tokens when given); ``spans`` aligns them
    (:func:`~purekd.stages.align_spans`, ``shift=1``: causal LMs' unshifted logits). Both
    tokenizers must be fast (``ValueError`` naming the one that is not, and the fix). The
    offsets are dropped from the model inputs (models do not take them).

    Use it as a ``DataLoader``'s ``collate_fn`` over a dataset of strings. An item may also be a
    ``(prompt, completion)`` pair of strings: the text is ``prompt + completion`` and only the
    completion is in the loss (each side's ``labels`` are ``-100`` on the tokens that start
    before the completion's first character, so spans over the prompt are dropped) — the data
    form of an on-policy rollout across tokenizers.
    """

    def __init__(self, tokenizer_S: Any, tokenizer_T: Any, *, max_length: int | None = None,
                 shift: int = 1) -> None:
        check_offsets_support(tokenizer_S, "student")
        check_offsets_support(tokenizer_T, "teacher")
        self.tokenizer_S, self.tokenizer_T = tokenizer_S, tokenizer_T
        self.max_length, self.shift = max_length, shift

    def _encode(self, tokenizer: Any, texts: list[str], prompt_chars: list[int]
                ) -> dict[str, Any]:
        # right-padded whatever the tokenizer's padding_side: a causal LM numbers positions
        # from column 0 unless given position ids, so left padding would shift every row
        encoded = tokenizer(texts, return_offsets_mapping=True, padding=True,
                            padding_side="right",
                            truncation=self.max_length is not None, max_length=self.max_length,
                            return_tensors="pt")
        batch = dict(encoded)
        outside = batch["attention_mask"] == 0
        if any(prompt_chars):
            starts = batch["offset_mapping"][..., 0]
            outside = outside | (starts < torch.tensor(prompt_chars).unsqueeze(1))
        batch["labels"] = batch["input_ids"].masked_fill(outside, -100)
        return batch

    def __call__(self, texts: Sequence[str | tuple[str, str]]) -> dict[str, Any]:
        joined: list[str] = []
        prompt_chars: list[int] = []
        for item in texts:
            if isinstance(item, str):
                joined.append(item)
                prompt_chars.append(0)
            elif (isinstance(item, (tuple, list)) and len(item) == 2
                  and all(isinstance(part, str) for part in item)):
                joined.append(item[0] + item[1])
                prompt_chars.append(len(item[0]))
            else:
                raise TypeError("CrossTokenizerCollator: the batch must be a list of strings or "
                                "of (prompt, completion) pairs of strings")
        batch_S = self._encode(self.tokenizer_S, joined, prompt_chars)
        batch_T = self._encode(self.tokenizer_T, joined, prompt_chars)
        spans = align_batches(batch_S, batch_T, tokenizer_S=self.tokenizer_S,
                              tokenizer_T=self.tokenizer_T, texts=joined, shift=self.shift)
        batch_S.pop("offset_mapping")
        batch_T.pop("offset_mapping")
        return {STUDENT_KEY: batch_S, TEACHER_KEY: batch_T, SPANS_KEY: spans}


__all__ = ["CrossTokenizerCollator", "align_batches", "check_offsets_support",
           "check_same_texts"]
