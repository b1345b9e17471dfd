"""Epochs from a top-k teacher cache on disk cost what training the student alone costs.

A random-initialised Llama teacher writes its top-k (k=64, float16) for every token once
(untimed). Then a Llama student trains for ``1 + E`` epochs two ways on the same batches, each
a plain loop (forward, loss, backward, SGD):

* ``student only``: its own next-token cross-entropy, from a loader of the token data;
* ``from the cache``: the same cross-entropy plus ``topk_kl`` against the cached teacher, from
  ``CachedTeacherDataset`` + ``CachedCollate`` (memory-mapped lookup by sample id, padding);
  no teacher in memory.

Epochs 2 .. 1 + E are timed (the first warms caches and allocators). ``topk_kl`` is
``purekd.losses.topk_kl`` when it exists, else a float32 implementation of its definition
(said in the output). Target: <= 1.05x.

    python -m benchmarks.cached_topk [--samples 48] [--length 128] [--vocab 16384] [--epochs 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from benchmarks._common import device, synchronize, write

TARGET = 1.05
K = 64


def _llama(vocab: int, hidden: int, layers: int, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64), max_position_embeddings=1024))


class _Tokens(Dataset):
    def __init__(self, n: int, length: int, vocab: int):
        gen = torch.Generator().manual_seed(0)
        lengths = torch.randint(length // 2, length + 1, (n,), generator=gen)
        self.items = [torch.randint(vocab, (int(m),), generator=gen) for m in lengths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.items[index]}


def _pad(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    length = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, item in enumerate(items):
        ids[row, :len(item["input_ids"])], mask[row, :len(item["input_ids"])] = item["input_ids"], 1
    return {"input_ids": ids, "attention_mask": mask}


def _topk_kl() -> tuple[Any, str]:
    import purekd.losses as losses

    if hasattr(losses, "topk_kl"):
        return losses.topk_kl, "purekd.losses.topk_kl"

    def topk_kl(logits_S: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, *,
                mask: torch.Tensor) -> torch.Tensor:  # renormalised teacher (tail=False)
        log_p = torch.log_softmax(logits_S.float(), -1).gather(-1, ids)
        q_hat = torch.softmax(logprobs, -1)
        rows = (q_hat * (torch.log_softmax(logprobs, -1) - log_p)).sum(-1)
        w = mask.float()
        return (rows * w).sum() / w.sum().clamp_min(1)

    return topk_kl, "float32 implementation of the definition"


def _next_token_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels.reshape(-1))


def run(samples: int = 48, length: int = 128, vocab: int = 16384, batch_size: int = 8,
        epochs: int = 2, repeats: int = 3, hidden: int = 256, layers: int = 4) -> dict[str, Any]:
    from purekd.teacher_cache import (
        CachedCollate,
        CachedTeacherDataset,
        TeacherCache,
        WithSampleIds,
        write_teacher_cache,
    )

    where = device()
    data = _Tokens(samples, length, vocab)
    teacher = _llama(vocab, hidden, 2, seed=0).eval().to(where)
    folder = tempfile.mkdtemp(prefix="purekd-cached-topk-")

    def with_ids(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"sample_id": torch.tensor([item["sample_id"] for item in items]),
                "teacher": _pad([item["teacher"] for item in items])}

    write_teacher_cache(teacher, lambda b, o: {"logits": o.logits, "logits_mask": b["attention_mask"]},
                        DataLoader(WithSampleIds(data), batch_size=batch_size, collate_fn=with_ids),
                        folder, k=K, values="float16", progress_bar=False)
    del teacher
    cache = TeacherCache(folder, vocab_size=vocab)
    cached_data = CachedTeacherDataset(data, cache)
    topk_kl, source = _topk_kl()
    student0 = _llama(vocab, hidden, layers, seed=1).to(where)

    def train(from_cache: bool) -> float:
        student = copy.deepcopy(student0).train()
        optimizer = torch.optim.SGD(student.parameters(), lr=1e-3)
        loader = (DataLoader(cached_data, batch_size=batch_size, shuffle=True,
                             collate_fn=CachedCollate(_pad), generator=torch.Generator().manual_seed(0))
                  if from_cache else
                  DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=_pad,
                             generator=torch.Generator().manual_seed(0)))
        elapsed = 0.0
        for epoch in range(1 + epochs):
            synchronize()
            start = time.perf_counter()
            for batch in loader:
                student_batch = batch["student"] if from_cache else batch
                ids = student_batch["input_ids"].to(where)
                mask = student_batch["attention_mask"].to(where)
                logits = student(input_ids=ids, attention_mask=mask).logits
                loss = _next_token_ce(logits, ids, mask)
                if from_cache:
                    cached = batch["teacher_cache"]
                    loss = loss + topk_kl(logits, cached["topk_ids"].to(where),
                                          cached["topk_logprobs"].to(where),
                                          mask=cached["topk_mask"].to(where))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            synchronize()
            if epoch > 0:
                elapsed += time.perf_counter() - start
        return elapsed / epochs

    train(True)
    train(False)  # warm-up (kernels, page cache)
    cached_times, alone_times = [], []
    for _ in range(repeats):
        cached_times.append(train(True))
        alone_times.append(train(False))
    per_epoch_cached, per_epoch_alone = statistics.median(cached_times), statistics.median(alone_times)
    return {"samples": samples, "length": length, "vocab": vocab, "k": K, "epochs": epochs,
            "student": f"Llama {layers}x{hidden}", "topk_kl": source,
            "cached_epoch_s": per_epoch_cached, "student_only_epoch_s": per_epoch_alone,
            "ratio": per_epoch_cached / per_epoch_alone, "target": TARGET}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    result = run(args.samples, args.length, args.vocab, args.batch_size, args.epochs, args.repeats)
    print(json.dumps(result, indent=2))
    write("cached_topk", result, args.out)
    return result


if __name__ == "__main__":
    main()
