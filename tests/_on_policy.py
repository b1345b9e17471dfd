"""Tiny random causal LMs (from configs, nothing downloaded) and prompt batches for the
on-policy tests."""

from __future__ import annotations

import os
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, EOS, PAD, BOS = 24, 2, 0, 1


def tiny_llama(layers: int, width: int, seed: int, *, vocab: int = VOCAB, context: int = 32,
               dropout: float = 0.0) -> Any:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=context, tie_word_embeddings=False, eos_token_id=EOS,
        pad_token_id=PAD, bos_token_id=BOS, attention_dropout=dropout)
    return transformers.LlamaForCausalLM(config).double()


def tiny_gpt2(seed: int, *, vocab: int = VOCAB, context: int = 32) -> Any:
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=context, n_embd=8, n_layer=1,
                                     n_head=2, eos_token_id=EOS, bos_token_id=BOS,
                                     pad_token_id=PAD)
    return transformers.GPT2LMHeadModel(config).double()


def prompt_batch() -> dict[str, torch.Tensor]:
    """Three left-padded prompts of lengths 3, 5 and 1."""
    prompts = torch.tensor([[PAD, PAD, 5, 6, 7], [3, 4, 5, 6, 7], [PAD, PAD, PAD, PAD, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    return {"prompts": prompts, "prompt_attention_mask": mask}


def full_batch() -> dict[str, torch.Tensor]:
    """Prompts plus the batch's own sequences (right-padded, labels -100 on the prompt)."""
    batch = prompt_batch()
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, PAD], [3, 4, 5, 6, 7, 11, 12],
                              [9, 13, 14, 15, PAD, PAD, PAD]])
    attention_mask = (torch.arange(7) < torch.tensor([[6], [7], [4]])).long()
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[0, :3] = -100
    labels[1, :5] = -100
    labels[2, :1] = -100
    return {**batch, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tiny_cache(folder: Any) -> tuple[Any, Any]:
    """A real top-k teacher cache of four token sequences, written to ``folder``:
    ``(CachedTeacherDataset, TeacherCache)``."""
    from purekd.teacher_cache import CachedTeacherDataset, TeacherCache
    from tests.teacher_cache._helpers import TinyLM, Tokens, write

    data = Tokens(4, vocab=VOCAB)
    write(TinyLM(seed=0, vocab=VOCAB), data, folder, k=4)
    cache = TeacherCache(folder)
    return CachedTeacherDataset(data, cache), cache


class Recording:
    """A sampler that counts its calls and returns, for every prompt, ``width`` copies of
    ``token`` with the mask ``kept`` (1: sampled tokens, 0: none)."""

    def __init__(self, width: int, token: int = EOS, kept: int = 1):
        self.width, self.token, self.kept, self.calls = width, token, kept, 0

    def __call__(self, model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                 seed: int) -> Any:
        from purekd.stages import Sample

        self.calls += 1
        shape = (prompt_ids.size(0), self.width)
        return Sample(torch.full(shape, self.token), torch.full(shape, self.kept))
