"""``rollout``: sample completions of prompts and lay them out as sequences both models score.

A :class:`Rollout` is right-padded: each row is ``[prompt][completion][padding]`` (the prompts'
left padding is moved to the end), so positions count from 0 at each prompt's first token —
as ``generate`` counted them — without position ids. ``completion_mask`` marks the sampled
tokens; prompt and padding tokens are in no loss and no token count.

:func:`completion_rows` turns a causal LM's adapted outputs on a rollout into the rows the KD
loss sees: row ``t`` predicts token ``t + 1``, so the kept rows are those whose next token is a
completion token. A fused output layer (``lm_hidden``) is cut to those rows (``(B, C, H)``, ``C``
the longest completion): no prompt row goes through the output layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ._adapt import Adapted
from ._next_token import shift_left
from ._sampler import Sampler


class Rollout(NamedTuple):
    """Sampled sequences, right-padded, all ``(B, L)``: ``input_ids`` int64, ``attention_mask``
    0/1 (prompt and completion tokens), ``completion_mask`` 0/1 (completion tokens only),
    ``sampler_logprobs`` float (the sampler's log-probability at each completion token, 0
    elsewhere) or ``None``; ``prompt_lengths`` and ``completion_lengths`` ``(B,)`` int64."""

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    sampler_logprobs: Tensor | None
    prompt_lengths: Tensor
    completion_lengths: Tensor


@contextmanager
def sampling_mode(model: Any) -> Iterator[None]:
    """``model`` in eval mode (dropout off) under ``torch.no_grad``; every submodule's own
    train/eval mode is restored on exit."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    modes = [m.training for m in modules]
    try:
        if isinstance(model, nn.Module):
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.training = mode


def check_prompts(prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
    """The prompts' lengths ``(B,)``; raises unless they are left-padded and non-empty."""
    if prompt_ids.dim() != 2 or tuple(prompt_mask.shape) != tuple(prompt_ids.shape):
        raise ValueError(f"on-policy: prompts {tuple(prompt_ids.shape)} and "
                         f"prompt_attention_mask {tuple(prompt_mask.shape)} must both be "
                         "(batch, prompt_length)")
    if prompt_ids.is_floating_point():
        raise TypeError(f"on-policy: prompts must be token ids, got {prompt_ids.dtype}")
    real = (prompt_mask != 0).to(torch.int64)
    lengths = real.sum(-1)
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"on-policy: prompt(s) {empty} have no tokens (prompt_attention_mask "
                         "all 0); give every sample at least one prompt token")
    if bool((real[:, 1:] < real[:, :-1]).any()):
        rows = (real[:, 1:] < real[:, :-1]).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"on-policy: prompt(s) {rows} are not left-padded (a padding token "
                         "follows a real one); sampling continues each prompt after its last "
                         "column, so pad prompts on the left (tokenizer.padding_side = 'left')")
    return lengths


def _text_config(model: Any) -> Any:
    """The model's (text) config: ``config.get_text_config()`` where it has one (a multimodal
    model's language part), else ``config``; ``None`` without one."""
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", None)
    return text() if callable(text) else config


def vocabulary_rows(model: Any) -> int | None:
    """The number of entries of ``model``'s next-token distribution: the rows of its output
    layer (``get_output_embeddings().weight``, ``(V, H)``), else ``config.vocab_size``;
    ``None`` when it has neither (a plain module)."""
    get = getattr(model, "get_output_embeddings", None)
    layer = get() if callable(get) else None
    weight = getattr(layer, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    size = getattr(_text_config(model), "vocab_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def check_same_vocabulary(model_T: Any, model_S: Any, *, shared_vocab: bool = False,
                          seq_kd: bool = False) -> None:
    """Raise unless teacher and student have next-token distributions over one vocabulary.

    Their sizes (:func:`vocabulary_rows`) must be equal, or — ``shared_vocab``: one tokenizer,
    output layers padded to different sizes — the sampling model's (the student's; the
    teacher's with ``seq_kd``) no larger than the other's, which must have a row for every id
    it can sample. A model whose size is unknown is not checked."""
    size_T, size_S = vocabulary_rows(model_T), vocabulary_rows(model_S)
    if size_T is None or size_S is None or size_T == size_S:
        return
    if not shared_vocab:
        raise ValueError(
            f"on-policy: the teacher's next-token distribution has {size_T} entries and the "
            f"student's {size_S} (their output layers' rows): the teacher scores the sampled "
            "token ids as they are, so both models must share one tokenizer. For different "
            "tokenizers use cross-tokenizer distillation (kd_loss_type 'uld' or 'gold'; "
            "docs/cross-tokenizer.md); if they share one tokenizer and only their output layers "
            "are padded to different sizes, set DistillationConfig(shared_vocab=True)")
    sampler, other = (("teacher", "student") if seq_kd else ("student", "teacher"))
    sizes = {"teacher": size_T, "student": size_S}
    if sizes[sampler] > sizes[other]:
        raise ValueError(
            f"on-policy: the {sampler} samples from {sizes[sampler]} entries but the {other}'s "
            f"output layer has {sizes[other]} rows (shared_vocab=True): a sampled id >= "
            f"{sizes[other]} has no row in the {other}. Resize the {sampler}'s output layer to "
            f"{sizes[other]} rows, or sample with the smaller model")


def check_context(prompt_lengths: Tensor, max_new_tokens: int,
                  models: Sequence[tuple[str, Any]]) -> None:
    """Raise when the longest prompt plus ``max_new_tokens`` exceeds a model's context
    (``config.max_position_embeddings`` or ``config.n_positions``, where the model has one)."""
    longest = int(prompt_lengths.max())
    index = int(prompt_lengths.argmax())
    for who, model in models:
        config = _text_config(model)
        context = (getattr(config, "max_position_embeddings", None)
                   or getattr(config, "n_positions", None))
        if isinstance(context, int) and longest + max_new_tokens > context:
            raise ValueError(
                f"on-policy: the longest prompt (sample {index}, {longest} tokens) plus "
                f"max_new_tokens={max_new_tokens} is {longest + max_new_tokens} positions, past "
                f"the {who}'s context of {context}: truncate the prompts to at most "
                f"{max(context - max_new_tokens, 0)} tokens or lower max_new_tokens")


def _left_align(values: Tensor, shift: Tensor, fill: int | float) -> Tensor:
    """Each row moved ``shift[b]`` positions left, ``fill`` in the freed columns."""
    length = values.size(1)
    columns = torch.arange(length, device=values.device).unsqueeze(0) + shift.unsqueeze(1)
    moved = values.gather(1, columns.clamp(max=length - 1))
    return torch.where(columns < length, moved, torch.as_tensor(fill, dtype=values.dtype,
                                                                device=values.device))


def rollout(sampler: Sampler, model: Any, prompt_ids: Tensor, prompt_mask: Tensor, *,
            seed: int, pad_token_id: int = 0) -> Rollout:
    """Sample a completion of each prompt with ``model`` and lay out the sequences.

    The model samples in eval mode under ``torch.no_grad`` (:func:`sampling_mode`; its modes
    are restored). ``pad_token_id`` fills the padding (never scored).
    """
    prompt_lengths = check_prompts(prompt_ids, prompt_mask)
    with sampling_mode(model):
        sample = sampler(model, prompt_ids, prompt_mask, seed=seed)
    completions, mask = sample.completions, (sample.completion_mask != 0).to(torch.int64)
    if completions.dim() != 2 or completions.size(0) != prompt_ids.size(0) or (
            tuple(mask.shape) != tuple(completions.shape)):
        raise ValueError(f"on-policy: the sampler returned completions "
                         f"{tuple(completions.shape)} and a mask {tuple(mask.shape)} for "
                         f"{prompt_ids.size(0)} prompts; expected both (batch, completion_length)")
    prompt_width = prompt_ids.size(1)
    shift = prompt_width - prompt_lengths
    ids = torch.cat([prompt_ids, completions.to(prompt_ids.dtype)], 1)
    real = torch.cat([(prompt_mask != 0).to(torch.int64), mask], 1)
    sampled = torch.cat([torch.zeros_like(prompt_ids, dtype=torch.int64), mask], 1)
    completion_lengths = mask.sum(-1)
    length = max(int((prompt_lengths + completion_lengths).max()), 1)
    attention_mask = _left_align(real, shift, 0)[:, :length]
    input_ids = torch.where(attention_mask != 0, _left_align(ids, shift, pad_token_id)[:, :length],
                            pad_token_id)
    completion = _left_align(sampled, shift, 0)[:, :length]
    logprobs = None
    if sample.logprobs is not None:
        padded = torch.cat([torch.zeros(prompt_ids.shape, dtype=sample.logprobs.dtype,
                                        device=prompt_ids.device), sample.logprobs], 1)
        logprobs = torch.where(completion != 0, _left_align(padded, shift, 0.0)[:, :length], 0.0)
    return Rollout(input_ids, attention_mask, completion, logprobs, prompt_lengths,
                   completion_lengths)


def completion_rows(adapted: Adapted, rollout: Rollout, pad_token_id: int = 0) -> Adapted:
    """A causal LM's adapted outputs on ``rollout``, restricted to the completion rows.

    Row ``t`` predicts token ``t + 1``; kept rows: the next token is a completion token (and the
    adaptor's own ``logits_mask``, when it gave one, keeps the row). Sets ``logits_mask``,
    ``next_ids`` (the sampled token each row predicts) and ``sampler_logprobs``. ``logits``
    keep their ``(B, L, V)`` rows (masked); ``lm_hidden`` ``(B, L, H)`` is cut to the
    completion rows ``(B, C, H)`` (row ``j`` of sample ``b`` predicts its ``j``-th sampled
    token), with ``labels`` and the masks cut alike.
    """
    if len(adapted.logits) > 1:
        raise ValueError(f"on-policy: the adaptor returned {len(adapted.logits)} logits; a "
                         "causal language model returns one (B, L, V) tensor")
    keep_rows = shift_left(rollout.completion_mask, 0)
    next_ids = shift_left(rollout.input_ids, pad_token_id)
    row_logprobs = (None if rollout.sampler_logprobs is None
                    else shift_left(rollout.sampler_logprobs, 0.0))
    own_mask = adapted.logits_mask[0] if adapted.logits_mask else None
    if adapted.lm_hidden is not None and tuple(adapted.lm_hidden.shape[:2]) == tuple(
            rollout.input_ids.shape):
        width = max(int(rollout.completion_lengths.max()), 1)
        length = adapted.lm_hidden.size(1)
        start = (rollout.prompt_lengths - 1).unsqueeze(1)
        offsets = torch.arange(width, device=start.device).unsqueeze(0)
        index = (start + offsets).clamp(max=length - 1)
        keep = (offsets < rollout.completion_lengths.unsqueeze(1)).to(torch.int64)

        def cut(values: Tensor) -> Tensor:
            return values.gather(1, index.to(values.device))

        if own_mask is not None:
            keep = keep * (cut(own_mask) != 0).to(torch.int64)
        hidden = adapted.lm_hidden.gather(
            1, index.to(adapted.lm_hidden.device).unsqueeze(-1).expand(
                -1, -1, adapted.lm_hidden.size(-1)))
        return adapted._replace(
            lm_hidden=hidden, logits_mask=(keep,), labels=tuple(cut(t) for t in adapted.labels),
            next_ids=cut(next_ids), sampler_logprobs=None if row_logprobs is None
            else cut(row_logprobs))
    if not adapted.logits and adapted.lm_hidden is None:
        return adapted
    rows = adapted.logits[0] if adapted.logits else adapted.lm_hidden
    assert rows is not None
    if rows.dim() != 3 or tuple(rows.shape[:2]) != tuple(rollout.input_ids.shape):
        what = "logits" if adapted.logits else "lm_hidden"
        raise ValueError(
            f"on-policy: the adaptor's {what} have shape {tuple(rows.shape)}, but the sampled "
            f"sequences are {tuple(rollout.input_ids.shape)}: return one row per position "
            "(batch, length, ...), unshifted (row t predicts token t + 1), as "
            "hf_adaptor(causal=True) does")
    keep = keep_rows if own_mask is None else keep_rows * (own_mask != 0).to(torch.int64)
    return adapted._replace(logits_mask=(keep,), next_ids=next_ids,
                            sampler_logprobs=row_logprobs)


def check_same_tokenizer(tokenizer_T: Any, tokenizer_S: Any) -> None:
    """Raise unless the two tokenizers agree on the vocabulary size and on a few ids (the
    special tokens and a probe text): the teacher scores the student's token ids as they are."""
    fix = ("on-policy distillation feeds the student's sampled token ids to the teacher, so both "
           "must share one tokenizer; for different tokenizers use cross-tokenizer distillation "
           "(kd_loss_type 'uld' or 'gold')")
    size_T, size_S = len(tokenizer_T), len(tokenizer_S)
    if size_T != size_S:
        raise ValueError(f"on-policy: the teacher's tokenizer has {size_T} tokens and the "
                         f"student's {size_S}: {fix}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        a, b = getattr(tokenizer_T, name, None), getattr(tokenizer_S, name, None)
        if a != b:
            raise ValueError(f"on-policy: the tokenizers' {name} differ (teacher {a}, student "
                             f"{b}): {fix}")
    probe = "The quick brown fox: 1234, jumps!"
    ids_T = tokenizer_T(probe, add_special_tokens=False)["input_ids"]
    ids_S = tokenizer_S(probe, add_special_tokens=False)["input_ids"]
    if list(ids_T) != list(ids_S):
        raise ValueError(f"on-policy: the tokenizers encode {probe!r} differently (teacher "
                         f"{list(ids_T)}, student {list(ids_S)}): {fix}")


__all__ = ["Rollout", "check_context", "check_prompts", "check_same_tokenizer",
           "check_same_vocabulary", "completion_rows", "rollout", "sampling_mode",
           "vocabulary_rows"]
