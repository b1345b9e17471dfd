"""Samplers: draw completions of prompts from a model (the on-policy stage's only I/O with a
decoding backend).

A sampler is any callable with the :class:`Sampler` signature: left-padded prompts in, the
completion tokens, their mask and (where the backend has them) the sampler's log-probabilities
out. Two backends ship, tested: :class:`HFGenerateSampler` (``transformers``' ``generate`` with
the KV cache), the reference, and :class:`KVCacheSampler` (the same draws from its own decode
loop over the model's KV cache, without ``generate``'s per-token machinery). An inference server (vLLM, SGLang) plugs in as a class with the same
``__call__``; see ``docs/on-policy.md``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from ._packed_linears import packed_linears


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


def _stops_and_pad(stop_token_ids: tuple[int, ...], pad_token_id: int | None,
                   model: Any) -> tuple[tuple[int, ...], int]:
    """The stop ids (``stop_token_ids``, else the model's ``generation_config.eos_token_id``)
    and the pad id (``pad_token_id``, else the model's, else the first stop id, else 0)."""
    defaults = getattr(model, "generation_config", None)
    stops = stop_token_ids or _as_ids(getattr(defaults, "eos_token_id", None))
    pad = pad_token_id
    if pad is None:
        pad = getattr(defaults, "pad_token_id", None)
        if isinstance(pad, (list, tuple)):
            pad = pad[0] if pad else None
    if pad is None:
        pad = stops[0] if stops else 0
    return stops, int(pad)


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
        return _stops_and_pad(self.stop_token_ids, self.pad_token_id, model)

    def __call__(self, model: Any, prompt_ids: Tensor, prompt_mask: Tensor, *,
                 seed: int) -> Sample:
        import transformers  # optional dependency: imported only when sampling with it

        stops, pad = self.stops_and_pad(model)
        config = transformers.GenerationConfig(
            do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p),
            top_k=int(self.top_k), max_new_tokens=self.max_new_tokens,
            eos_token_id=list(stops) or None, pad_token_id=pad, use_cache=True,
            return_dict_in_generate=True, output_scores=self.logprobs)
        synced = _synced(self.synced_gpus)
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


def _synced(synced_gpus: bool | None) -> bool:
    """``synced_gpus``, or (``None``) whether ``torch.distributed`` runs with several processes."""
    if synced_gpus is not None:
        return synced_gpus
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _forward_parameters(model: Any) -> frozenset[str]:
    """The keyword names ``model.forward`` takes (all of them when it takes ``**kwargs``)."""
    forward = getattr(model, "forward", model)
    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD)


class KVCacheSampler:
    """A :class:`Sampler` with its own decode loop over a causal LM's KV cache: the draws of
    :class:`HFGenerateSampler` (tested token for token, greedy and sampled with one seed),
    without ``generate``'s per-token machinery (input preparation, logits-processor lists,
    stopping-criteria objects, cache-position bookkeeping).

    The loop: one prefill of the left-padded prompts (``position_ids`` = the count of real
    tokens before each position, as ``generate`` numbers them), then one token per step
    through the cache, the output layer on the last position only (``logits_to_keep=1`` where
    the model's forward takes it). On a CPU (``packed_weights``, the default) the model's plain
    float32 ``nn.Linear`` layers compute through oneDNN on copies of their weights packed once
    per call for the batch's rows (:func:`~purekd.stages._packed_linears.packed_linears`: the
    same products, about twice as fast for so few rows; the copies live for the call;
    ``False``: the model's own products). Each step's float32 scores ``z`` (the last
    position's logits) are processed as ``generate`` processes them, in its order:
    ``z / temperature`` (when not 1), the ``top_k`` filter (entries below the ``k``-th largest
    set to ``-inf``), the ``top_p`` nucleus filter (the smallest set of largest entries whose
    probability reaches ``top_p``, at least one); then one draw ``torch.multinomial(softmax(z), 1)`` per
    row from the global generator (forked and seeded with ``seed``, as
    :class:`HFGenerateSampler` does, so the same seed draws the same tokens). ``top_k=1``
    (greedy) takes ``argmax z`` without the filters or a draw (same token; log-probability 0:
    the distribution is a point mass). A row that has sampled a stop token gets
    ``pad_token_id`` from then on; the loop ends when every row has stopped or after
    ``max_new_tokens`` tokens; with ``synced_gpus`` (``None``: on when ``torch.distributed``
    runs with more than one process) the ranks agree each step (an all-reduce of their
    unfinished rows) and a finished rank keeps stepping with the others, as FSDP needs.

    Differences from ``generate``, on purpose: only ``temperature``, ``top_k`` and ``top_p``
    shape the distribution (``generate`` also applies whatever else the model's
    ``generation_config`` sets, e.g. a ``repetition_penalty``); the model must return
    ``logits`` and its KV cache (``cache``, or ``past_key_values`` in older ``transformers``;
    their causal LMs do) — else a ``ValueError``
    pointing to :class:`HFGenerateSampler`. ``logprobs``: as :class:`HFGenerateSampler`
    (``log_softmax`` of the processed scores at the sampled token; ``False``: ``None``).
    """

    def __init__(self, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, stop_token_ids: Sequence[int] = (),
                 pad_token_id: int | None = None, synced_gpus: bool | None = None,
                 logprobs: bool = True, packed_weights: bool = True):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"KVCacheSampler(max_new_tokens={max_new_tokens!r}): give an int "
                             ">= 1")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                and temperature > 0):
            raise ValueError(f"KVCacheSampler(temperature={temperature!r}): give a finite "
                             "number > 0 (greedy decoding: top_k=1)")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"KVCacheSampler(top_p={top_p!r}): give a number in (0, 1] "
                             "(1: no nucleus filter)")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"KVCacheSampler(top_k={top_k!r}): give an int >= 0 (0: no top-k "
                             "filter, 1: greedy)")
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = top_k
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self.pad_token_id = pad_token_id
        self.synced_gpus = synced_gpus
        self.logprobs = logprobs
        self.packed_weights = bool(packed_weights)

    def stops_and_pad(self, model: Any) -> tuple[tuple[int, ...], int]:
        """The stop ids and the pad id this sampler uses for ``model`` (as
        :meth:`HFGenerateSampler.stops_and_pad`)."""
        return _stops_and_pad(self.stop_token_ids, self.pad_token_id, model)

    def process(self, scores: Tensor) -> Tensor:
        """The sampling distribution's log-weights ``(B, V)`` from float32 scores ``(B, V)``:
        temperature, then top-k, then top-p, as ``generate``'s warpers apply them."""
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k:
            k = min(self.top_k, scores.size(-1))
            kth = torch.topk(scores, k)[0][..., -1, None]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if self.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(-1).cumsum(-1)
            remove = cumulative <= 1 - self.top_p
            remove[..., -1:] = False  # keep at least one entry
            scores = scores.masked_fill(remove.scatter(1, order, remove), -math.inf)
        return scores

    def __call__(self, model: Any, prompt_ids: Tensor, prompt_mask: Tensor, *,
                 seed: int) -> Sample:
        stops, pad = self.stops_and_pad(model)
        synced = _synced(self.synced_gpus)
        device = prompt_ids.device
        takes = _forward_parameters(model)
        extra: dict[str, Any] = {"use_cache": True}
        if "logits_to_keep" in takes:
            extra["logits_to_keep"] = 1
        mask = (prompt_mask != 0).to(torch.int64)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        with_positions = "position_ids" in takes
        # transformers >= 5.2x names the KV cache ``cache`` (``past_key_values`` before)
        cache_name = "cache" if "cache" in takes else "past_key_values"
        stop_ids = torch.tensor(stops, device=device) if stops else None
        greedy = self.top_k == 1
        unfinished = torch.ones(prompt_ids.size(0), dtype=torch.int64, device=device)
        tokens: list[Tensor] = []
        logprobs: list[Tensor] = []
        devices = [device] if device.type == "cuda" else []
        packing = (packed_linears(model, prompt_ids.size(0))
                   if self.packed_weights and device.type == "cpu" else nullcontext())
        with torch.random.fork_rng(devices=devices), torch.no_grad(), packing:
            torch.manual_seed(seed)
            outputs = model(input_ids=prompt_ids, attention_mask=mask,
                            **({"position_ids": positions} if with_positions else {}), **extra)
            last = positions[:, -1:]
            for step in range(self.max_new_tokens):
                logits, cache = _logits_and_cache(outputs)
                scores = logits[:, -1].to(torch.float32)
                if greedy:
                    chosen = scores.argmax(-1)
                    if self.logprobs:
                        logprobs.append(scores.new_zeros(chosen.shape))
                else:
                    scores = self.process(scores)
                    chosen = torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)
                    if self.logprobs:
                        logprobs.append(torch.log_softmax(scores, -1).gather(
                            1, chosen.unsqueeze(1)).squeeze(1))
                chosen = chosen * unfinished + pad * (1 - unfinished)
                tokens.append(chosen)
                if stop_ids is not None:
                    unfinished = unfinished * (~torch.isin(chosen, stop_ids)).to(torch.int64)
                if step + 1 == self.max_new_tokens or _all_done(unfinished, synced):
                    break
                mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], 1)
                last = last + 1
                outputs = model(input_ids=chosen.unsqueeze(1), attention_mask=mask,
                                **{cache_name: cache},
                                **({"position_ids": last} if with_positions else {}), **extra)
        completions = torch.stack(tokens, 1)
        completion = completion_mask(completions, stops)
        completions = torch.where(completion != 0, completions, pad)
        if not self.logprobs:
            return Sample(completions, completion, None)
        return Sample(completions, completion,
                      torch.where(completion != 0, torch.stack(logprobs, 1), 0.0))


def _logits_and_cache(outputs: Any) -> tuple[Tensor, Any]:
    logits = getattr(outputs, "logits", None)
    cache = getattr(outputs, "cache", None)
    if cache is None:
        cache = getattr(outputs, "past_key_values", None)
    if not isinstance(logits, Tensor) or logits.dim() != 3 or cache is None:
        raise ValueError(
            f"KVCacheSampler: the model returned {type(outputs).__name__} without (B, L, V) "
            "'logits' and a KV cache ('cache' or 'past_key_values'); it decodes with the model's KV cache, as "
            "transformers' causal LMs return it (use_cache=True). For another model use "
            "HFGenerateSampler (model.generate) or a sampler of your own")
    return logits, cache


def _all_done(unfinished: Tensor, synced: bool) -> bool:
    """Whether every row (``synced``: of every rank) has stopped."""
    left = unfinished.sum()
    if synced:
        from purekd._collectives import all_reduce

        all_reduce(left)  # in place: the sum is a tensor of its own
    return int(left) == 0


__all__ = ["HFGenerateSampler", "KVCacheSampler", "Sample", "Sampler", "completion_mask"]
