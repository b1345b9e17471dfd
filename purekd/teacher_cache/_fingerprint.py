"""Fingerprints: short digests that tell whether a cache was written by this teacher and for
this tokenizer (vocabulary), checked when the cache is read."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


def fingerprint_model(model: nn.Module) -> str:
    """sha256 over the model's state dict: every name, dtype, shape and the bytes of every
    tensor, in name order. Equal weights give equal fingerprints on any device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        flat = value.reshape(-1)  # a 0-dim tensor cannot be viewed as bytes; the same bytes
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def _vocabulary(tokenizer: Any) -> Any:
    if isinstance(tokenizer, Mapping):
        return sorted((str(k), int(v)) for k, v in tokenizer.items())
    if isinstance(tokenizer, Sequence) and not isinstance(tokenizer, str):
        return [str(token) for token in tokenizer]
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        raise TypeError(
            f"tokenizer: expected a Hugging Face tokenizer (with get_vocab()), a dict token -> "
            f"id or a list of tokens, got {type(tokenizer).__name__}")
    vocab = sorted((str(k), int(v)) for k, v in get_vocab().items())
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    return {"vocab": vocab, "special": special}


def fingerprint_tokenizer(tokenizer: Any) -> str:
    """sha256 of a vocabulary: a Hugging Face tokenizer (its ``get_vocab()`` and special
    tokens), a dict token -> id, or a list of tokens (id = position). A string is taken as an
    already computed fingerprint and returned as it is."""
    if isinstance(tokenizer, str):
        return tokenizer
    text = json.dumps(_vocabulary(tokenizer), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


__all__ = ["fingerprint_model", "fingerprint_tokenizer"]
