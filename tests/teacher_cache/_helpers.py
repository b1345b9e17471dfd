"""A tiny random-initialised Llama teacher and student, token data of varied lengths, and the
collate functions and adaptors the teacher-cache tests share."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from purekd.teacher_cache import WithSampleIds, write_teacher_cache

VOCAB = 96


def llama(seed: int, hidden: int = 32, layers: int = 2, vocab: int = VOCAB) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


class CausalOutput(NamedTuple):
    logits: Tensor


class TinyLM(torch.nn.Module):
    """A causal LM without transformers (for subprocess tests, which should start fast):
    position ``t``'s logits depend on tokens ``0..t`` through a running mean of embeddings."""

    def __init__(self, seed: int = 0, vocab: int = VOCAB, width: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> CausalOutput:
        del attention_mask  # causal: padding on the right never reaches earlier positions
        h = self.embed(input_ids).cumsum(1)
        h = h / torch.arange(1, input_ids.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return CausalOutput(self.out(torch.tanh(self.mix(h))) * 3)


class Tokens(Dataset):
    """``n`` token sequences of lengths 3..13; item ``i`` is ``{'input_ids': (L_i,)}``."""

    def __init__(self, n: int = 20, seed: int = 0, vocab: int = VOCAB):
        gen = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, 14, (n,), generator=gen)
        self.items = [torch.randint(vocab, (int(n),), generator=gen) for n in lengths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.items[index]}


def pad(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Right padding to the longest item, with an attention mask."""
    length = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, item in enumerate(items):
        ids[row, :len(item["input_ids"])] = item["input_ids"]
        mask[row, :len(item["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def with_ids_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"sample_id": torch.tensor([item["sample_id"] for item in items]),
            "teacher": pad([item["teacher"] for item in items])}


def live_adaptor(batch: dict[str, Tensor], outputs: Any) -> dict[str, Any]:
    return {"logits": outputs.logits, "logits_mask": batch["attention_mask"]}


def writer_loader(data: Dataset, batch_size: int = 4, shuffle: bool = False,
                  seed: int = 0) -> DataLoader:
    return DataLoader(WithSampleIds(data), batch_size=batch_size, shuffle=shuffle,
                      collate_fn=with_ids_collate, generator=torch.Generator().manual_seed(seed))


def write(teacher: torch.nn.Module, data: Dataset, out: Path, **options: Any) -> Any:
    loader_options = {key: options.pop(key) for key in ("batch_size", "shuffle", "seed")
                      if key in options}
    options.setdefault("k", 8)
    return write_teacher_cache(teacher, live_adaptor, writer_loader(data, **loader_options), out,
                               progress_bar=False, **options)


def exact_topk(teacher: torch.nn.Module, tokens: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The teacher's float32 top-k (ids, log-probs) for one unpadded sequence ``(L,)``."""
    with torch.no_grad():
        logits = teacher(input_ids=tokens[None]).logits[0]
    values, ids = torch.log_softmax(logits.float(), -1).topk(k, -1)
    return ids, values


def files(folder: Path) -> dict[str, bytes]:
    """Every file of a folder by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
