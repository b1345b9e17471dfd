"""Samplers: draw completions of prompts from a model (the on-policy stage's only I/O with a
decoding backend).

A sampler is any callable with the :class:`Sampler` signature: left-padded prompts in, the
completion tokens, their mask and (where the backend has them) the sampler's log-probabilities
out. One backend ships, tested: :class:`HFGenerateSampler` (``transformers``' ``generate`` with
the KV cache). An inference server (vLLM, SGLang) plugs in as a class with the same
``__call__``; see ``docs/on-policy.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor


class Sample(NamedTuple):
    """What a sampler returns for ``B`` prompts.

    ``completions`` ``(B, C)`` int64: the sampled tokens of each prompt, left-aligned (column 0
    is the first sampled token), anything after the completion's end (``C`` is the longest
    completion, at most ``max_new_tokens``); ``completion_mask`` ``(B, C)`` 0/1: 1 on the sampled
    tokens, the stop token included, 0 after it; ``logprobs`` ``(B, C)`` float or ``None``: the
    sampler's log-probability of each sampled token under the distribution it sampled from
    (after temperature, top-k, top-p), 0 where the mask is 0.
    """

    completions: Tensor
    completion_mask: Tensor
    logprobs: Tensor | None = None


class Sampler(Protocol):
    """``sampler(model, prompt_ids, prompt_mask, *, seed) -> Sample``.

    ``prompt_ids`` / ``prompt_mask`` ``(B, P)``: the prompts, left-padded (the real tokens of
    each row at its end, as ``tokenizer(padding_side="left")`` gives); ``model``: the model to
    sample from (in eval mode, under ``torch.no_grad``, when the on-policy stage calls);
    ``seed``: an int drawn from the stage's generator, so that a run (and a resumed run) samples
    the same completions. A sampler must not change the global random state.
    """

    def __call__(self, model: Any, prompt_ids: Tensor, prompt_mask: Tensor, *,
                 seed: int) -> Sample: ...


def completion_mask(completions: Tensor, stop_ids: Sequence[int]) -> Tensor:
    """``(B, C)`` int64: 1 up to and including the first stop token of each row, 0 after it
    (all 1 when no stop token was sampled)."""
    if not stop_ids:
        return torch.ones_like(completions, dtype=torch.int64)
    stops = torch.isin(completions, torch.tensor(list(stop_ids), device=completions.device))
    seen_before = stops.to(torch.int64).cumsum(-1) - stops.to(torch.int64)
    return (seen_before == 0).to(torch.int64)


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


class HFGenerateSampler:
    """A :class:`Sampler` over ``transformers``' ``model.generate`` (KV cache, ancestral sampling).

    ``temperature``, ``top_p``, ``top_k`` (0: off): the sampling distribution. ``stop_token_ids``
    (empty: the model's ``generation_config.eos_token_id``) end a completion; ``pad_token_id``
    (``None``: the model's, else the first stop token, else 0) fills after it. The returned
    log-probabilities are ``log_softmax`` of ``generate``'s processed scores (after the
    temperature and the filters) at the sampled tokens: the distribution actually sampled from.

    Reproducible: the global random state is forked (CPU and the model's CUDA device), seeded
    with ``seed``, and restored after ``generate`` (which draws from the global generator).
    ``synced_gpus`` (``None``: on when ``torch.distributed`` runs with more than one process):
    every rank keeps stepping until all are done, as FSDP needs (each step all-gathers).

    ``logprobs=False``: no log-probabilities (``Sample.logprobs`` is ``None``), and ``generate``
    keeps no scores — with them it holds one ``(B, V)`` float32 tensor per sampled position
    until it returns (``B * max_new_tokens * V * 4`` bytes: 400 MB at 8 x 256 x 49k). The
    sampled-token loss then takes the sampler to be the student (importance ratio 1).
    """

    def __init__(self, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, stop_token_ids: Sequence[int] = (),
                 pad_token_id: int | None = None, synced_gpus: bool | None = None,
                 logprobs: bool = True):
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.stop_token_ids = tuple(stop_token_ids)
        self.pad_token_id = pad_token_id
        self.synced_gpus = synced_gpus
        self.logprobs = logprobs

    def stops_and_pad(self, model: Any) -> tuple[tuple[int, ...], int]:
        """The stop ids and the pad id this sampler uses for ``model``."""
        defaults = getattr(model, "generation_config", None)
        stops = self.stop_token_ids or _as_ids(getattr(defaults, "eos_token_id", None))
        pad = self.pad_token_id
        if pad is None:
            pad = getattr(defaults, "pad_token_id", None)
            if isinstance(pad, (list, tuple)):
                pad = pad[0] if pad else None
        if pad is None:
            pad = stops[0] if stops else 0
        return stops, int(pad)

    def __call__(self, model: Any, prompt_ids: Tensor, prompt_mask: Tensor, *,
                 seed: int) -> Sample:
        import transformers  # optional dependency: imported only when sampling with it

        stops, pad = self.stops_and_pad(model)
        config = transformers.GenerationConfig(
            do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p),
            top_k=int(self.top_k), max_new_tokens=self.max_new_tokens,
            eos_token_id=list(stops) or None, pad_token_id=pad, use_cache=True,
            return_dict_in_generate=True, output_scores=self.logprobs)
        synced = self.synced_gpus
        if synced is None:
            synced = (torch.distributed.is_available() and torch.distributed.is_initialized()
                      and torch.distributed.get_world_size() > 1)
        device = prompt_ids.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                 generation_config=config, synced_gpus=synced)
        completions = out.sequences[:, prompt_ids.size(1):]
        mask = completion_mask(completions, stops)
        completions_out = torch.where(mask != 0, completions, pad)
        if not self.logprobs:
            return Sample(completions_out, mask, None)
        columns = []
        for t, scores in enumerate(out.scores[:completions.size(1)]):
            chosen = completions[:, t:t + 1]
            scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
            columns.append(torch.log_softmax(scores, -1).gather(1, chosen).squeeze(1))
        logprobs = (torch.stack(columns, 1) if columns
                    else completions.new_zeros(completions.shape, dtype=torch.float32))
        return Sample(completions_out, mask, torch.where(mask != 0, logprobs, 0.0))


__all__ = ["HFGenerateSampler", "Sample", "Sampler", "completion_mask"]
