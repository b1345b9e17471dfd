"""The on-disk format of a top-k teacher cache: record layout, value codecs, checksums, atomic
files and the manifest.

A cache is a folder::

    manifest.json                  k, vocabulary size, value dtype, fingerprints, shard list
    index.npy                      (samples, 4) int64 rows [sample id, shard, first row, length],
                                   sorted by sample id
    rank00000-shard00000.rows.npy  one record per kept token (structured NumPy array)
    rank00000-shard00000.index.npy (samples, 2) int64 rows [sample id, length] in write order
    rank00000.progress.json        what rank 0 has finished (a resumed writer starts from it)

Every ``.npy`` file is a plain NumPy array file, opened memory-mapped; every file is written to a
temporary name, flushed to disk and renamed with ``os.replace``, so a crash leaves whole files.
A token's record holds the teacher's ``k`` most likely next-token ids (descending probability)
and their log-probabilities at temperature 1 in one of the codecs of :data:`VALUE_DTYPES`, and
the input token itself when the writer knew it.

A **cross-tokenizer** cache (the teacher's tokenizer is not the student's; format version 2,
``cross_tokenizer: true`` in the manifest) also stores per token what aligning the teacher's
tokenisation with the student's needs: the token's character offsets ``(start, end)`` in the
sample's text, ``next`` — the log-probability of the token that follows in the teacher's
sequence (exact, whatever ``k``: the merged span distribution needs it) — and ``text``, the
first 8 bytes of the sha256 of the sample's text (the same on every row of the sample), so
that a reader given another text refuses it. Version 1 caches (one tokenizer) are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from purekd._atomic import atomic_write

FORMAT = "purekd-teacher-cache"
VERSION = 1
CROSS_VERSION = 2
"""The version of a cross-tokenizer cache (version 1 plus the per-token offsets, the next
token's log-probability and the text digest); a plain cache is still written as version 1."""
VERSIONS = (VERSION, CROSS_VERSION)
MANIFEST = "manifest.json"
INDEX = "index.npy"

VALUE_DTYPES = ("float32", "float16", "bfloat16", "q8")
"""Codecs for the log-probabilities: ``float32`` (exact), ``float16`` and ``bfloat16`` (2 bytes
a value), ``q8`` (1 byte a value plus 4 bytes a token: each token's top value and step in
float16, values ``top - code * step`` with ``code`` in 0..255 spread over the row's range)."""

LOGPROB_FLOOR = -1.0e4
"""Log-probabilities below this (``-inf`` from masked logits included) are stored as this."""

Q8_RANGE = 30.0
"""``q8`` covers at most this many nats below each token's top value; lower values (probability
below ``e^-30 ~ 1e-13`` of the top one) are stored at the bottom of the range."""


class CacheError(ValueError):
    """A teacher cache that cannot be used as asked (the message says why and what to do)."""


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type holding ids ``0 .. vocab_size - 1``."""
    if vocab_size <= 2**8:
        return np.dtype("<u1")
    if vocab_size <= 2**16:
        return np.dtype("<u2")
    if vocab_size <= 2**32:
        return np.dtype("<u4")
    return np.dtype("<i8")


def version_of(cross: bool) -> int:
    """The format version a cache is written in."""
    return CROSS_VERSION if cross else VERSION


def text_digest(text: str) -> int:
    """The first 8 bytes of the sha256 of ``text`` (UTF-8), as an unsigned 64-bit int."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def record_dtype(k: int, vocab_size: int, values: str, with_tokens: bool,
                 cross: bool = False) -> np.dtype:
    """One token's record: ``ids`` ``(k,)``, the encoded log-probabilities, the input token;
    with ``cross``, also ``next`` (float32), ``offsets`` ``(2,)`` uint32 and ``text`` uint64."""
    ids = id_dtype(vocab_size)
    fields: list[tuple[Any, ...]] = [("ids", ids, (k,))]
    if values == "float32":
        fields.append(("logprobs", "<f4", (k,)))
    elif values in ("float16",):
        fields.append(("logprobs", "<f2", (k,)))
    elif values == "bfloat16":
        fields.append(("logprobs", "<u2", (k,)))  # the bfloat16 bit patterns
    elif values == "q8":
        fields += [("codes", "<u1", (k,)), ("top", "<f2"), ("step", "<f2")]
    else:
        raise ValueError(f"values={values!r}: expected one of {VALUE_DTYPES}")
    if with_tokens:
        fields.append(("token", ids))
    if cross:
        fields += [("next", "<f4"), ("offsets", "<u4", (2,)), ("text", "<u8")]
    return np.dtype(fields)


class CrossFields(NamedTuple):
    """A sample's cross-tokenizer fields: ``next`` ``(N,)`` float32, ``offsets`` ``(N, 2)``,
    ``text`` (its :func:`text_digest`)."""

    next: Tensor
    offsets: Tensor
    text: int


def encode(ids: Tensor, logprobs: Tensor, tokens: Tensor | None, dtype: np.dtype,
           values: str, cross: CrossFields | None = None) -> np.ndarray:
    """Records for ``N`` tokens from ``ids`` ``(N, k)``, ``logprobs`` ``(N, k)`` (descending,
    float32), ``tokens`` ``(N,)`` (or ``None``) and the cross-tokenizer fields (or ``None``)."""
    records = np.zeros(ids.shape[0], dtype=dtype)
    records["ids"] = ids.cpu().numpy().astype(dtype["ids"].base, copy=False)
    lp = logprobs.detach().float().cpu().clamp_min(LOGPROB_FLOOR)
    if values == "float32":
        records["logprobs"] = lp.numpy()
    elif values == "float16":
        records["logprobs"] = lp.half().numpy()
    elif values == "bfloat16":
        records["logprobs"] = lp.bfloat16().view(torch.int16).numpy().view(np.uint16)
    else:  # q8
        top = lp[:, 0].half().float()  # the row maximum (values are sorted descending)
        bottom = torch.maximum(lp[:, -1], top - Q8_RANGE)
        # rounded up to float16 so that 255 steps reach the bottom of the row
        step = ((top - bottom) / 255 * (1 + 2.0**-10)).half().float()
        safe = torch.where(step > 0, step, torch.ones_like(step))
        codes = ((top[:, None] - lp) / safe[:, None]).round().clamp(0, 255)
        records["codes"] = codes.to(torch.uint8).numpy()
        records["top"] = top.half().numpy()
        records["step"] = step.half().numpy()
    if tokens is not None:
        records["token"] = tokens.cpu().numpy().astype(dtype["token"], copy=False)
    if cross is not None:
        records["next"] = cross.next.detach().float().cpu().clamp_min(LOGPROB_FLOOR).numpy()
        records["offsets"] = cross.offsets.cpu().numpy().astype(np.uint32)
        records["text"] = cross.text
    return records


def field(records: np.ndarray, name: str) -> np.ndarray:
    """A fresh C-ordered copy of one field of the records (a field of a structured array, or
    of a memory map, is a strided view that ``torch.from_numpy`` cannot take)."""
    return np.array(records[name], order="C", copy=True)


def decode_logprobs(records: np.ndarray, values: str) -> Tensor:
    """The float32 log-probabilities ``(N, k)`` of ``N`` records."""
    if values == "q8":
        codes = torch.from_numpy(field(records, "codes")).float()
        top = torch.from_numpy(field(records, "top")).float()
        step = torch.from_numpy(field(records, "step")).float()
        return top[:, None] - codes * step[:, None]
    raw = field(records, "logprobs")
    if values == "bfloat16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(raw).float()


def decode_ids(records: np.ndarray) -> Tensor:
    return torch.from_numpy(field(records, "ids").astype(np.int64, copy=False))


def bytes_per_token(k: int, vocab_size: int, values: str, with_tokens: bool,
                    cross: bool = False) -> int:
    """Bytes on disk per kept token (the per-sample index adds 48 bytes a sample)."""
    return record_dtype(k, vocab_size, values, with_tokens, cross).itemsize


# -- files --------------------------------------------------------------------------------------

def sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_array(path: str | os.PathLike[str], array: np.ndarray) -> str:
    """Write ``array`` as a ``.npy`` file atomically; returns its sha256."""
    atomic_write(path, lambda file: np.save(file, array, allow_pickle=False))
    return sha256(path)


def save_json(path: str | os.PathLike[str], value: Mapping[str, Any]) -> None:
    """Deterministic JSON (sorted keys), written atomically."""
    text = json.dumps(value, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def load_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path, encoding="utf-8") as file:
        return dict(json.load(file))


def shard_name(rank: int, number: int) -> str:
    return f"rank{rank:05d}-shard{number:05d}"


def progress_name(rank: int) -> str:
    return f"rank{rank:05d}.progress.json"


__all__ = [
    "CROSS_VERSION",
    "FORMAT",
    "INDEX",
    "LOGPROB_FLOOR",
    "MANIFEST",
    "Q8_RANGE",
    "VALUE_DTYPES",
    "VERSION",
    "VERSIONS",
    "CacheError",
    "CrossFields",
    "atomic_write",
    "bytes_per_token",
    "decode_ids",
    "decode_logprobs",
    "encode",
    "field",
    "id_dtype",
    "load_json",
    "progress_name",
    "record_dtype",
    "save_array",
    "save_json",
    "sha256",
    "shard_name",
    "text_digest",
    "version_of",
]
