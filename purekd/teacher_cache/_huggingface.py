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
    """Token sequences with their sample ids: item ``i`` is ``{'input_ids': (L_i,) int64}``.
    ``texts``: each sample's text (``None`` for one given as ``input_ids``), when known."""

    def __init__(self, ids: Sequence[int], tokens: Sequence[Tensor],
                 texts: Sequence[str | None] | None = None):
        if len(ids) != len(tokens):
            raise ValueError(f"{len(ids)} ids but {len(tokens)} token sequences")
        self.ids, self.tokens = list(ids), list(tokens)
        self.texts = list(texts) if texts is not None else None

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.tokens[index]}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(value: Any, where: str, vocab_size: int | None) -> list[int]:
    """A record's ``input_ids``: a non-empty JSON list of integers in the vocabulary."""
    limit = f"integers in 0..{vocab_size - 1}" if vocab_size is not None else "integers >= 0"
    if not isinstance(value, list):
        raise ValueError(f"{where}: 'input_ids' must be a list of token ids ({limit}), got "
                         f"{value!r} ({type(value).__name__})")
    for position, token in enumerate(value):
        if not (_is_int(token) and token >= 0 and (vocab_size is None or token < vocab_size)):
            raise ValueError(f"{where}: 'input_ids' must be a list of token ids ({limit}); item "
                             f"{position} is {token!r} ({type(token).__name__})")
    return list(value)


def read_samples(path: str | os.PathLike[str], tokenizer: Any, *, max_length: int | None = None,
                 text_key: str = "text", limit: int | None = None,
                 vocab_size: int | None = None) -> TokenSamples:
    """Samples of a data file, tokenised and cut to ``max_length``; every problem is a
    ``ValueError`` naming the file, the line and the field.

    * A text file (any suffix but ``.jsonl`` / ``.json``): one sample per non-empty line, its id
      the line number from 0.
    * A JSON-lines file: one object a line with the text under ``text_key`` or already tokenised
      ``input_ids`` (a list of integers, in ``0 .. vocab_size - 1`` when ``vocab_size`` is given).
      Ids: either every record has an ``"id"`` — a JSON integer that fits in 64 bits (no
      strings, no floats, no booleans: map other ids to integers first) — or none has, and the
      id is the line number from 0. Ids must be distinct (a repeat names both lines).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--data {str(file)!r}: no such file")
    jsonl = file.suffix in (".jsonl", ".json")
    ids: list[int] = []
    lines: dict[int, int] = {}  # id -> line (from 1)
    texts: list[str] = []
    token_lists: list[list[int] | None] = []
    first_record: tuple[int, bool] | None = None  # (line, has an id)
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if limit is not None and len(ids) >= limit:
                break
            if not line.strip():
                continue
            where = f"{file}:{number + 1}"
            sample_id = number
            given: list[int] | None = None
            text = ""
            if not jsonl:
                text = line.rstrip("\n")
            else:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{where}: not JSON ({error})") from error
                if not isinstance(record, dict):
                    raise ValueError(f"{where}: expected an object with {text_key!r} (text) or "
                                     f"'input_ids' (tokens), got a {type(record).__name__}")
                has_id = "id" in record
                if first_record is None:
                    first_record = (number + 1, has_id)
                elif has_id != first_record[1]:
                    raise ValueError(
                        f"{where}: {'an' if has_id else 'no'} 'id', but line {first_record[0]} "
                        f"has {'none' if has_id else 'one'}: give every record an 'id' or none "
                        "(then the ids are the line numbers)")
                if has_id:
                    sample_id = record["id"]
                    if not _is_int(sample_id):
                        raise ValueError(
                            f"{where}: 'id' must be an integer, got {sample_id!r} "
                            f"({type(sample_id).__name__}); map other ids to integers first "
                            "(e.g. keep your ids in another field and number the records)")
                    if not -2**63 <= sample_id < 2**63:
                        raise ValueError(f"{where}: 'id' {sample_id} does not fit in 64 bits")
                if "input_ids" in record:
                    given = _token_ids(record["input_ids"], where, vocab_size)
                elif isinstance(record.get(text_key), str):
                    text = record[text_key]
                else:
                    raise ValueError(f"{where}: expected an object with {text_key!r} (text) or "
                                     "'input_ids' (tokens); pass --text-key for another field")
            if sample_id in lines:
                raise ValueError(f"{where}: sample id {sample_id} repeats line "
                                 f"{lines[sample_id]}: every sample needs its own id")
            lines[sample_id] = number + 1
            ids.append(sample_id)
            texts.append(text)
            token_lists.append(given)
    if not ids:
        raise ValueError(f"--data {str(file)!r}: no samples")
    tokens = []
    for sample_id, text, given in zip(ids, texts, token_lists, strict=True):
        sequence = given if given is not None else tokenizer(text)["input_ids"]
        if max_length is not None:
            sequence = sequence[:max_length]
        if not sequence:
            raise ValueError(f"{file}:{lines[sample_id]}: no tokens (sample id {sample_id})")
        tokens.append(torch.tensor(sequence, dtype=torch.long))
    return TokenSamples(ids, tokens, [text if given is None else None
                                      for text, given in zip(texts, token_lists, strict=True)])


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
                    progress_bar: bool | None = None, student_tokenizer: Any = None,
                    max_length: int | None = None) -> CacheSummary:
    """Write the cache of a causal LM over ``samples`` (batched longest first, to pad little).
    ``student_tokenizer`` (not the teacher's): a cross-tokenizer cache of the samples' texts,
    each tokenised by ``tokenizer`` (cut to ``max_length``) with its offsets."""
    from ._cross import TeacherTextCollate
    from ._dataset import WithSampleIds

    order = sorted(range(len(samples)), key=lambda i: (-len(samples.tokens[i]), samples.ids[i]))
    ids = [samples.ids[i] for i in order]
    vocab = model.get_output_embeddings().weight.shape[0]
    if student_tokenizer is not None:
        texts = [samples.texts[i] if samples.texts is not None else None for i in order]
        if any(text is None for text in texts):
            raise ValueError("a cross-tokenizer cache (--student-tokenizer) stores character "
                             "offsets in each sample's text: give texts, not 'input_ids'")
        loader = DataLoader(WithSampleIds(texts, ids), batch_size=batch_size,
                            collate_fn=TeacherTextCollate(tokenizer, max_length=max_length))
    else:
        ordered = TokenSamples(ids, [samples.tokens[i] for i in order])
        pad_id = (tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None
                  else 0)
        loader = DataLoader(WithSampleIds(ordered, ordered.ids), batch_size=batch_size,
                            collate_fn=lambda items: _pad_with_ids(items, pad_id))
    return write_teacher_cache(model, _adaptor, loader, out, k=k, values=values,
                               vocab_size=vocab, tokenizer=tokenizer,
                               student_tokenizer=student_tokenizer, shard_samples=shard_samples,
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
    student_tokenizer = None
    if getattr(args, "student_tokenizer", None) is not None:
        try:
            from transformers import AutoTokenizer

            student_tokenizer = AutoTokenizer.from_pretrained(args.student_tokenizer)
        except (OSError, ValueError) as error:
            print(f"purekd cache-teacher: --student-tokenizer {args.student_tokenizer!r}: "
                  f"{error}", file=sys.stderr)
            return 2
    loaded = time.perf_counter()
    try:
        lm: Any = model
        vocab = int(lm.get_output_embeddings().weight.shape[0])
        samples = read_samples(args.data, tokenizer, max_length=args.max_length,
                               text_key=args.text_key, limit=args.limit, vocab_size=vocab)
    except (OSError, ValueError) as error:
        print(f"purekd cache-teacher: {error}", file=sys.stderr)
        return 2
    try:
        summary = cache_causal_lm(model, tokenizer, samples, args.out, k=args.k,
                                  values=args.values, batch_size=args.batch_size,
                                  shard_samples=args.shard_samples, device=device,
                                  progress_bar=None if not args.quiet else False,
                                  student_tokenizer=student_tokenizer,
                                  max_length=args.max_length)
    except ValueError as error:
        print(f"purekd cache-teacher: {error}", file=sys.stderr)
        return 2
    on_disk = sum(p.stat().st_size for p in Path(args.out).iterdir() if p.is_file())
    from ._reader import TeacherCache

    cache = TeacherCache(args.out, verify=False)
    tokens = int(cache.lengths.sum())
    seconds = time.perf_counter() - loaded
    cross = ", cross-tokenizer" if cache.cross_tokenizer else ""
    print(f"cached {len(cache)} samples, {tokens} tokens (k={cache.k}, {cache.values}, "
          f"vocabulary {cache.vocab_size}{cross}) in {args.out}\n"
          f"  this run: {summary.samples} samples, {summary.tokens} tokens written, "
          f"{summary.skipped_samples} already there\n"
          f"  {summary.bytes_per_token:.0f} bytes/token in records, "
          f"{on_disk / max(tokens, 1):.1f} bytes/token on disk ({on_disk / 2**20:.2f} MiB)\n"
          f"  time: {seconds:.1f} s caching ({summary.tokens / max(seconds, 1e-9):.0f} tokens/s), "
          f"{loaded - start:.1f} s loading the model")
    return 0


__all__ = ["TokenSamples", "cache_causal_lm", "load_causal_lm", "read_samples",
           "run_cache_teacher"]
