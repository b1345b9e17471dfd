"""``purekd cache-teacher``: cache a Hugging Face causal language model's top-k over a text or
tokenised data set. A model is a directory (``config.json`` + weights) or a GGUF file."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ._writer import CacheSummary, write_teacher_cache

GGUF_MAGIC = b"GGUF"


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist: give a folder "
                                "with config.json and the weights, or --gguf FILE")
    if not path.is_dir():
        raise ValueError(f"model {str(path)!r} is a file, not a directory: for a GGUF file use "
                         "--gguf FILE; otherwise give the folder with config.json")
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json: it is not a "
                         "Hugging Face model folder (save one with model.save_pretrained)")
    if not os.access(path / "config.json", os.R_OK):
        raise PermissionError(f"{path / 'config.json'} is not readable")


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"--gguf {str(path)!r}: no such file")
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except OSError as error:
        raise PermissionError(f"--gguf {str(path)!r}: cannot read it ({error})") from error
    if magic != GGUF_MAGIC:
        raise ValueError(f"--gguf {str(path)!r} is not a GGUF file (it starts with {magic!r}, "
                         f"not {GGUF_MAGIC!r})")


def load_causal_lm(model: str | os.PathLike[str] | None = None, *,
                   gguf: str | os.PathLike[str] | None = None,
                   device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` from a model directory or a GGUF file (dequantised by
    ``transformers``), the model in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf is not None:
        file = Path(gguf)
        _check_gguf(file)
        folder, options = str(file.parent), {"gguf_file": file.name}
    elif model is not None:
        _check_model_dir(Path(model))
        folder, options = str(model), {}
    else:
        raise ValueError("give a model directory or --gguf FILE")
    tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    lm: Any = AutoModelForCausalLM.from_pretrained(folder, **options)
    return lm.to(device).eval(), tokenizer


class TokenSamples(Dataset):
    """Token sequences with their sample ids: item ``i`` is ``{'input_ids': (L_i,) int64}``."""

    def __init__(self, ids: Sequence[int], tokens: Sequence[Tensor]):
        if len(ids) != len(tokens):
            raise ValueError(f"{len(ids)} ids but {len(tokens)} token sequences")
        self.ids, self.tokens = list(ids), list(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.tokens[index]}


def read_samples(path: str | os.PathLike[str], tokenizer: Any, *, max_length: int | None = None,
                 text_key: str = "text", limit: int | None = None) -> TokenSamples:
    """Samples of a text file (one per non-empty line; id = line number from 0) or a JSON-lines
    file (one object a line: ``text_key`` text, or ``input_ids`` tokens; id = its integer
    ``'id'`` if it has one, else the line number), tokenised and cut to ``max_length``."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--data {str(file)!r}: no such file")
    jsonl = file.suffix in (".jsonl", ".json")
    ids: list[int] = []
    texts: list[str] = []
    token_lists: list[list[int] | None] = []
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if limit is not None and len(ids) >= limit:
                break
            if not line.strip():
                continue
            if not jsonl:
                ids.append(number)
                texts.append(line.rstrip("\n"))
                token_lists.append(None)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{file}:{number + 1}: not JSON ({error})") from error
            sample_id = record.get("id", number) if isinstance(record, dict) else number
            if not isinstance(sample_id, int) or isinstance(sample_id, bool):
                sample_id = number
            if isinstance(record, dict) and "input_ids" in record:
                ids.append(sample_id)
                texts.append("")
                token_lists.append([int(t) for t in record["input_ids"]])
            elif isinstance(record, dict) and isinstance(record.get(text_key), str):
                ids.append(sample_id)
                texts.append(record[text_key])
                token_lists.append(None)
            else:
                raise ValueError(f"{file}:{number + 1}: expected an object with {text_key!r} "
                                 "(text) or 'input_ids' (tokens); pass --text-key for another "
                                 "field")
    if not ids:
        raise ValueError(f"--data {str(file)!r}: no samples")
    if len(set(ids)) != len(ids):
        raise ValueError(f"--data {str(file)!r}: repeated sample ids")
    tokens = []
    for text, given in zip(texts, token_lists, strict=True):
        sequence = given if given is not None else tokenizer(text)["input_ids"]
        if max_length is not None:
            sequence = sequence[:max_length]
        if not sequence:
            raise ValueError(f"--data {str(file)!r}: a sample has no tokens")
        tokens.append(torch.tensor(sequence, dtype=torch.long))
    return TokenSamples(ids, tokens)


def _pad_with_ids(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    length = max(len(item["teacher"]["input_ids"]) for item in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(items), length, dtype=torch.long)
    for row, item in enumerate(items):
        tokens = item["teacher"]["input_ids"]
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = 1
    return {"sample_id": torch.tensor([item["sample_id"] for item in items]),
            "teacher": {"input_ids": ids, "attention_mask": mask}}


def _adaptor(batch: dict[str, Tensor], outputs: Any) -> dict[str, Any]:
    return {"logits": outputs.logits, "logits_mask": batch["attention_mask"]}


def cache_causal_lm(model: Any, tokenizer: Any, samples: TokenSamples,
                    out: str | os.PathLike[str], *, k: int, values: str = "float16",
                    batch_size: int = 8, shard_samples: int = 1024,
                    device: str | torch.device = "cpu",
                    progress_bar: bool | None = None) -> CacheSummary:
    """Write the cache of a causal LM over ``samples`` (batched longest first, to pad little)."""
    from ._dataset import WithSampleIds

    order = sorted(range(len(samples)), key=lambda i: (-len(samples.tokens[i]), samples.ids[i]))
    ordered = TokenSamples([samples.ids[i] for i in order], [samples.tokens[i] for i in order])
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    loader = DataLoader(WithSampleIds(ordered, ordered.ids), batch_size=batch_size,
                        collate_fn=lambda items: _pad_with_ids(items, pad_id))
    vocab = model.get_output_embeddings().weight.shape[0]
    return write_teacher_cache(model, _adaptor, loader, out, k=k, values=values,
                               vocab_size=vocab, tokenizer=tokenizer, shard_samples=shard_samples,
                               device=device, progress_bar=progress_bar)


def run_cache_teacher(args: Any) -> int:
    """The ``cache-teacher`` command (``args`` from ``purekd.__main__``)."""
    import sys

    start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tokenizer = load_causal_lm(args.model, gguf=args.gguf, device=device)
    except ImportError as error:
        print(f"purekd cache-teacher needs transformers (pip install 'purekd[integrations]'): "
              f"{error}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:
        print(f"purekd cache-teacher: {error}", file=sys.stderr)
        return 2
    loaded = time.perf_counter()
    try:
        samples = read_samples(args.data, tokenizer, max_length=args.max_length,
                               text_key=args.text_key, limit=args.limit)
    except (OSError, ValueError) as error:
        print(f"purekd cache-teacher: {error}", file=sys.stderr)
        return 2
    summary = cache_causal_lm(model, tokenizer, samples, args.out, k=args.k, values=args.values,
                              batch_size=args.batch_size, shard_samples=args.shard_samples,
                              device=device, progress_bar=None if not args.quiet else False)
    on_disk = sum(p.stat().st_size for p in Path(args.out).iterdir() if p.is_file())
    from ._reader import TeacherCache

    cache = TeacherCache(args.out, verify=False)
    tokens = int(cache.lengths.sum())
    seconds = time.perf_counter() - loaded
    print(f"cached {len(cache)} samples, {tokens} tokens (k={cache.k}, {cache.values}, "
          f"vocabulary {cache.vocab_size}) in {args.out}\n"
          f"  this run: {summary.samples} samples, {summary.tokens} tokens written, "
          f"{summary.skipped_samples} already there\n"
          f"  {summary.bytes_per_token:.0f} bytes/token in records, "
          f"{on_disk / max(tokens, 1):.1f} bytes/token on disk ({on_disk / 2**20:.2f} MiB)\n"
          f"  time: {seconds:.1f} s caching ({summary.tokens / max(seconds, 1e-9):.0f} tokens/s), "
          f"{loaded - start:.1f} s loading the model")
    return 0


__all__ = ["TokenSamples", "cache_causal_lm", "load_causal_lm", "read_samples",
           "run_cache_teacher"]
