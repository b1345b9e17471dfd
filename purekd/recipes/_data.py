"""A recipe's data: records read from JSON lines, Parquet or a ``datasets`` directory, turned
into token rows with their loss labels, packed or padded, and batched the same way on one
process or across torchrun's ranks.

Every row is ``{'input_ids': (L,), 'attention_mask': (L,), 'labels': (L,)}`` (int64). ``labels``
are the tokens the loss reads — ``input_ids`` where the loss counts, ``-100`` where it does not
(prompt tokens with ``completion_only``, padding) — unshifted: the adaptor aligns position ``t``
with label ``t + 1`` (:func:`purekd.stages.next_token`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ._paths import resolve
from ._schema import Data

IGNORE = -100


# -- records -------------------------------------------------------------------------------


def read_records(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (``.jsonl``/``.json``, one object a line), a Parquet file
    (``.parquet``) or a ``datasets.save_to_disk`` directory; the first ``limit`` only."""
    source = resolve(path)
    records: list[dict[str, Any]] = []
    if source.is_dir():
        try:
            import datasets
        except ImportError as error:
            raise ValueError(f"data.path {path!r} is a directory, read as a dataset saved with "
                             f"datasets.save_to_disk; that needs pip install datasets "
                             f"({error})") from None
        loaded: Any = datasets.load_from_disk(str(source))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"data.path {path!r} holds the splits {list(loaded)}, none named "
                                 "'train': save the split to train on")
            loaded = loaded["train"]
        count = len(loaded) if limit is None else min(limit, len(loaded))
        return [dict(loaded[i]) for i in range(count)]
    if source.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(source)
        if limit is not None:
            table = table.slice(0, limit)
        return [dict(row) for row in table.to_pylist()]
    with open(source, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source}:{number}: not JSON ({error})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{source}:{number}: expected a JSON object a line, got "
                                 f"{type(record).__name__}")
            records.append(record)
    if not records:
        raise ValueError(f"data.path {path!r}: no records")
    return records


def record_format(data: Data, record: Mapping[str, Any]) -> str:
    """``data.format``, or for ``auto`` the format of ``record``'s keys."""
    if data.format != "auto":
        return data.format
    if data.messages_key in record:
        return "messages"
    if data.prompt_key in record and data.completion_key in record:
        return "prompt_completion"
    if data.text_key in record:
        return "text"
    if data.prompt_key in record:  # a prompt alone: an on-policy run samples its completion
        return "prompt_completion"
    raise ValueError(f"data.format auto: the first record's keys {sorted(record)} hold none of "
                     f"{data.text_key!r} (text), {data.prompt_key!r} + {data.completion_key!r} "
                     f"or {data.messages_key!r} (chat); set data.format and its key")


def _field(record: Mapping[str, Any], key: str, index: int, kind: type = str) -> Any:
    if key not in record:
        raise ValueError(f"record {index}: no {key!r} (its keys: {sorted(record)})")
    value = record[key]
    if not isinstance(value, kind):
        raise ValueError(f"record {index}: {key!r} is a {type(value).__name__}, expected a "
                         f"{kind.__name__}")
    return value


def _eos(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [] if eos is None else [int(eos)]


def encode(record: Mapping[str, Any], index: int, form: str, data: Data,
           tokenizer: Any) -> tuple[list[int], list[int]]:
    """:func:`encode_parts` without the prompt's length."""
    ids, labels, _ = encode_parts(record, index, form, data, tokenizer)
    return ids, labels


def encode_parts(record: Mapping[str, Any], index: int, form: str, data: Data,
                 tokenizer: Any) -> tuple[list[int], list[int], int]:
    """``(ids, labels)`` of one record. ``text``: the tokenizer's ids (special tokens included),
    every one a label. ``prompt_completion``: the prompt's ids (with the tokenizer's special
    tokens), then the completion's and the end-of-sequence token. ``messages``: the chat
    rendered by the tokenizer's chat template — the conversation before the last message with
    the assistant's generation prompt, then the rest (the last message, which must be the
    assistant's). With ``completion_only`` the prompt's labels are ``-100``. Returns
    ``(ids, labels, prompt_length)`` (0 for text)."""
    if form == "text":
        ids = list(tokenizer(_field(record, data.text_key, index))["input_ids"])
        return ids, list(ids), 0
    if form == "prompt_completion":
        prompt = list(tokenizer(_field(record, data.prompt_key, index))["input_ids"])
        completion = list(tokenizer(_field(record, data.completion_key, index),
                                    add_special_tokens=False)["input_ids"]) + _eos(tokenizer)
    elif form == "messages":
        messages = _field(record, data.messages_key, index, list)
        if not messages or not isinstance(messages[-1], Mapping) \
                or messages[-1].get("role") != "assistant":
            raise ValueError(f"record {index}: the last of its {data.messages_key!r} must be "
                             "the assistant's (the completion the student learns)")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("data.format messages needs a tokenizer with a chat template "
                             "(tokenizer.chat_template is None): give a chat model's tokenizer, "
                             "or use prompt_completion")
        before = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                               add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(messages, tokenize=False)
        if not whole.startswith(before):
            raise ValueError(f"record {index}: the chat template renders the conversation "
                             "without its last message as something that does not start the "
                             "whole conversation; this template cannot separate the completion")
        prompt = list(tokenizer(before, add_special_tokens=False)["input_ids"])
        completion = list(tokenizer(whole[len(before):], add_special_tokens=False)["input_ids"])
    else:
        raise ValueError(f"data.format {form!r}: not a format")
    labels = ([IGNORE] * len(prompt) if data.completion_only else list(prompt)) + completion
    return prompt + completion, labels, len(prompt)


# -- rows ----------------------------------------------------------------------------------


class Rows(NamedTuple):
    """Token rows and their labels: ``ids`` and ``labels`` lists of ``(L_i,)`` int64 tensors
    (all of length ``seq_len`` when packed); for on-policy runs ``prompts``, each row's prompt
    ``(P_i,)`` (the row's first ``P_i`` ids)."""

    ids: list[Tensor]
    labels: list[Tensor]
    prompts: list[Tensor] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def slice(self, start: int, stop: int | None) -> Rows:
        return Rows(self.ids[start:stop], self.labels[start:stop],
                    None if self.prompts is None else self.prompts[start:stop])


class Split(NamedTuple):
    train: Rows
    held_out: Rows | None
    tokens: int


def _pack(ids: list[int], labels: list[int], length: int) -> Rows:
    count = len(ids) // length
    table = torch.tensor(ids[:count * length], dtype=torch.long).view(count, length)
    marks = torch.tensor(labels[:count * length], dtype=torch.long).view(count, length)
    return Rows(list(table.clone()), list(marks.clone()))


def _prompt_alone(record: Mapping[str, Any], index: int, form: str, data: Data,
                  tokenizer: Any) -> list[int] | None:
    """The prompt ids of a record that has no completion — a ``prompt`` without
    ``completion``, a chat whose last message is not the assistant's (rendered with the
    generation prompt) — or ``None`` when it has one."""
    if form == "prompt_completion" and data.completion_key not in record:
        return list(tokenizer(_field(record, data.prompt_key, index))["input_ids"])
    if form == "messages":
        messages = _field(record, data.messages_key, index, list)
        if messages and isinstance(messages[-1], Mapping) \
                and messages[-1].get("role") != "assistant":
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError("data.format messages needs a tokenizer with a chat template "
                                 "(tokenizer.chat_template is None)")
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return None


def _prompted_rows(records: list[dict[str, Any]], data: Data, tokenizer: Any,
                   prompt_tokens: int | None, prompts_alone: bool = False) -> tuple[Rows, int]:
    """One record a row with its prompt, for on-policy runs: a prompt/completion or chat
    record's prompt part; a text record's first ``prompt_tokens`` tokens (its labels ``-100``
    there with ``completion_only``). ``prompts_alone`` (every batch sampled): a record may be
    a prompt without a completion (its row is the prompt, no label)."""
    ids_list, labels_list, prompts = [], [], []
    total = 0
    for index, record in enumerate(records):
        form = record_format(data, record)
        alone = None if form == "text" else _prompt_alone(record, index, form, data, tokenizer)
        if alone is not None:
            if not prompts_alone:
                raise ValueError(
                    f"data: record {index} is a prompt without a completion; with "
                    "on_policy.lmbda < 1 the batches not sampled train on the records' own "
                    "completions: give every record one, or set on_policy.lmbda: 1")
            ids, labels, length = alone, [IGNORE] * len(alone), len(alone)
        elif form == "text":
            if prompt_tokens is None:
                raise ValueError(
                    f"data: record {index} is text, which has no prompt to sample from "
                    "(teacher.source: on_policy): set on_policy.prompt_tokens (the first N "
                    "tokens of each record are its prompt), or give prompt_completion or "
                    "messages records")
            ids, _ = encode(record, index, form, data, tokenizer)
            length = min(prompt_tokens, len(ids))
            labels = ([IGNORE] * length + ids[length:]) if data.completion_only else list(ids)
        else:
            ids, labels, length = encode_parts(record, index, form, data, tokenizer)
        total += len(ids)
        ids_list.append(torch.tensor(ids[:data.seq_len], dtype=torch.long))
        labels_list.append(torch.tensor(labels[:data.seq_len], dtype=torch.long))
        prompts.append(torch.tensor(ids[:min(length, data.seq_len)], dtype=torch.long))
    for index, prompt in enumerate(prompts):
        if not len(prompt):
            raise ValueError(f"data: record {index} has an empty prompt: on-policy sampling "
                             "starts from each record's prompt; give every record one")
    return Rows(ids_list, labels_list, prompts), total


def _rows(records: list[dict[str, Any]], data: Data, tokenizer: Any) -> tuple[Rows, int]:
    form = record_format(data, records[0])
    if data.packing and form == "text":  # tokenised once, joined by the separator
        separator = data.separator
        if separator is None:
            separator = getattr(tokenizer, "eos_token", None) or "\n"
        texts = [_field(r, data.text_key, i) for i, r in enumerate(records)]
        ids = list(tokenizer(separator.join(texts), add_special_tokens=False)["input_ids"])
        return _pack(ids, ids, data.seq_len), len(ids)
    encoded = [encode(r, i, record_format(data, r), data, tokenizer)
               for i, r in enumerate(records)]
    total = sum(len(ids) for ids, _ in encoded)
    if data.packing:
        ids = [t for pair in encoded for t in pair[0]]
        labels = [t for pair in encoded for t in pair[1]]
        return _pack(ids, labels, data.seq_len), total
    rows = Rows([torch.tensor(ids[:data.seq_len], dtype=torch.long) for ids, _ in encoded],
                [torch.tensor(labels[:data.seq_len], dtype=torch.long) for _, labels in encoded])
    return rows, total


def build(data: Data, tokenizer: Any, *, prompts: bool = False,
          prompt_tokens: int | None = None, need_labels: bool = True) -> Split:
    """The training rows (the first ``train_rows``) and the held-out ones (the last
    ``eval_rows``, or ``eval_path``'s). ``prompts``: one record a row with its prompt (an
    on-policy run; ``prompt_tokens`` for text records); ``need_labels``: whether training
    rows must have a token to learn (not when every batch is sampled)."""
    def rows_of(records: list[dict[str, Any]]) -> tuple[Rows, int]:
        if prompts:
            return _prompted_rows(records, data, tokenizer, prompt_tokens,
                                  prompts_alone=not need_labels)
        return _rows(records, data, tokenizer)

    rows, tokens = rows_of(read_records(data.path, data.limit))
    held_out: Rows | None = None
    if data.eval_path is not None:
        held_out, _ = rows_of(read_records(data.eval_path))
    wanted = (data.train_rows or 0) + data.eval_rows
    if len(rows) < max(wanted, data.eval_rows + 1):
        raise ValueError(
            f"data: {len(rows)} rows of {data.seq_len} tokens, fewer than the "
            f"{data.train_rows or 'at least 1'} training + {data.eval_rows} held-out rows asked "
            "for: take more records (data.limit), a shorter data.seq_len, or fewer rows")
    if data.eval_rows:
        held_out = rows.slice(len(rows) - data.eval_rows, None)
    train = rows.slice(0, data.train_rows if data.train_rows is not None
                       else len(rows) - data.eval_rows)
    empty = sum(1 for labels in train.labels if not bool((labels[1:] != IGNORE).any()))
    if not need_labels:
        return Split(train, held_out, tokens)
    if empty == len(train):
        raise ValueError("data: no training row has a token to learn (every label is masked): "
                         "longer rows (data.seq_len), or data.completion_only: false")
    if empty:
        warnings.warn(f"data: {empty} of {len(train)} training rows have no token to learn (their "
                      f"completion lies beyond data.seq_len={data.seq_len}, or is empty); they "
                      "add nothing to the loss: raise data.seq_len", UserWarning, stacklevel=2)
    return Split(train, held_out, tokens)


class RowDataset(Dataset):
    """Item ``i``: ``{'input_ids', 'attention_mask', 'labels'}`` of row ``i`` (sample id
    ``i`` for the teacher cache)."""

    def __init__(self, rows: Rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        ids = self.rows.ids[index]
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": self.rows.labels[index]}
        if self.rows.prompts is not None:
            item["prompt"] = self.rows.prompts[index]
        return item


class PadCollate:
    """Stack items, right-padding to the longest with ``pad_id`` (attention mask 0, label
    ``-100``)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE}
        batch = {key: torch.full((len(items), length), value, dtype=torch.long)
                 for key, value in fill.items()}
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            for key in fill:
                batch[key][row, :n] = item[key]
        return batch


class PromptCollate:
    """:class:`PadCollate`'s batch plus the on-policy stage's prompts: ``prompts`` ``(B, P)``
    left-padded with ``pad_id`` and ``prompt_attention_mask`` (0 on the padding)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.sequences = PadCollate(pad_id)

    def __call__(self, items: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        batch = self.sequences(items)
        width = max(len(item["prompt"]) for item in items)
        prompts = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["prompt"])
            prompts[row, width - n:] = item["prompt"]
            mask[row, width - n:] = 1
        return {"prompts": prompts, "prompt_attention_mask": mask, **batch}


class RankBatches:
    """Batches of row indices for one rank, in the order ``DataLoader(shuffle=True,
    drop_last=True, generator=torch.Generator().manual_seed(seed))`` gives on one process.

    Build the loader as ``DataLoader(data, batch_sampler=b, generator=b.generator)``: the
    loader draws its worker seed from that generator at each pass, then each epoch draws a
    permutation of the rows (``torch.randperm``), cut into global batches of ``batch_size ×
    world_size`` (an incomplete last one dropped), rank ``r`` taking the ``r``-th
    ``batch_size`` of each; at the epoch's end it draws once more, as ``RandomSampler`` does.
    So on one process the order is exactly the shuffled ``DataLoader``'s, and on ``W`` ranks the
    ranks together see, step by step, the rows of one process with ``W`` times the batch (or
    ``W`` times the accumulation)."""

    def __init__(self, rows: int, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1):
        if rows < batch_size * world_size:
            raise ValueError(f"{rows} training rows make no batch of {batch_size} rows"
                             + (f" on each of {world_size} ranks" if world_size > 1 else "")
                             + ": more rows or a smaller train.batch_size")
        self.rows, self.batch_size, self.rank, self.world = rows, batch_size, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.rows // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.rows, generator=self.generator).tolist()
        width = self.batch_size * self.world
        for start in range(0, len(self) * width, width):
            first = start + self.rank * self.batch_size
            yield order[first:first + self.batch_size]
        torch.randperm(self.rows, generator=self.generator)  # RandomSampler's remainder draw


__all__ = ["IGNORE", "PadCollate", "PromptCollate", "RankBatches", "RowDataset", "Rows", "Split",
           "build", "encode", "encode_parts", "read_records", "record_format"]
