"""Training a student from a recipe: the one code path ``purekd distill`` and ``purekd demo
lm`` take.

:func:`train_student` builds, from the recipe's sections, what a user of the library writes by
hand for a causal LM: the loader (:class:`._data.RankBatches`), the adaptors
(``hf_adaptor(causal=True, lm_head=...)`` on both sides, or the cached top-k for the
teacher), the ``DistillationConfig`` and, with ``loss.ce_weight``, the KD term that adds the
text's cross-entropy in the same pass over the output layer, the optimizer and its schedule,
the ``TrainingConfig`` — and runs ``GeneralDistiller.train`` with the models called with
``output_hidden_states=True, logits_to_keep=1`` (no ``(rows, V)`` logits formed, under FSDP2
too: the sharded output layer is gathered for the fused pass).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._data import PadCollate, PromptCollate, RankBatches, RowDataset, Rows
from ._schema import Loss, OnPolicy, Recipe, Schedule


def kd_params(loss: Loss) -> dict[str, Any]:
    """The divergence's parameters the recipe sets (``beta``, ``alpha``, ``tail``, ``params``)."""
    given = {key: getattr(loss, key) for key in ("beta", "alpha", "tail")
             if getattr(loss, key) is not None}
    return {**given, **loss.params}


def distill_config(recipe: Recipe, tokenizer: Any = None) -> Any:
    """The ``DistillationConfig`` of the recipe's loss and, with ``teacher.source:
    on_policy``, its sampling (:func:`on_policy_config`; its own checks: a ``ValueError``
    naming the field)."""
    on_policy = None
    if recipe.teacher.source == "on_policy":
        on_policy = on_policy_config(recipe, tokenizer)
    return distill_config_of(recipe.loss, on_policy)


def on_policy_config(recipe: Recipe, tokenizer: Any = None) -> Any:
    """The ``purekd.OnPolicyConfig`` of the recipe's ``on_policy`` section (its defaults when
    absent). Stop tokens: the section's, else the tokenizer's end-of-sequence token; the
    filler after a completion: ``pad_token_id``, else the tokenizer's padding token."""
    import purekd

    section = recipe.on_policy if recipe.on_policy is not None else OnPolicy()
    stops = list(section.stop_token_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    if not stops and eos is not None:
        stops = [int(eos)]
    pad = section.pad_token_id
    if pad is None and getattr(tokenizer, "pad_token_id", None) is not None:
        pad = int(tokenizer.pad_token_id)
    return purekd.OnPolicyConfig(lmbda=section.lmbda, seq_kd=section.seq_kd,
                                 max_new_tokens=section.max_new_tokens,
                                 temperature=section.temperature, top_p=section.top_p,
                                 top_k=section.top_k, stop_token_ids=tuple(stops),
                                 pad_token_id=pad, seed=section.seed)


def distill_config_of(loss: Loss, on_policy: Any = None) -> Any:
    """:func:`distill_config` of a ``loss`` section (and an ``OnPolicyConfig``)."""
    import purekd

    params = {k: v for k, v in kd_params(loss).items() if not (k == "tail" and v is False)}
    spec: Any = [loss.kd_loss_type, params] if params else loss.kd_loss_type
    matches = [{"layer_T": m.layer_T, "layer_S": m.layer_S, "feature": m.feature,
                "loss": m.loss, "weight": m.weight, **({"proj": m.proj} if m.proj else {})}
               for m in loss.matches]
    return purekd.DistillationConfig(kd_loss_type=spec, temperature=loss.temperature,
                                     kd_loss_weight=1, hard_label_weight=0,
                                     intermediate_matches=matches or None, on_policy=on_policy)


def kd_and_text_term(loss: Loss) -> Any:
    """The KD term with the student's next-token cross-entropy mixed in, computed in the same
    pass over the output layer: ``(KD + c CE) / (1 + c)``, ``c = loss.ce_weight``."""
    import purekd

    return purekd.terms.token_kd(loss.kd_loss_type, temperature=loss.temperature,
                                 params=kd_params(loss),
                                 ce_weight=loss.ce_weight, weight=1 / (1 + loss.ce_weight))


def lr_factor(schedule: Schedule, total_steps: int) -> Callable[[int], float]:
    """The learning rate's factor at optimizer step ``s`` (``LambdaLR``): a linear warm-up over
    ``w = max(1, round(warmup · total))`` steps, ``(s + 1) / w``; then, with
    ``p = (s - w) / max(1, total - w)``: ``constant`` 1, ``linear`` ``max(0, 1 - p)``,
    ``cosine`` ``m + (1 - m) (1 + cos(π min(p, 1))) / 2`` (``m = min_lr_ratio``)."""
    warmup = max(1, round(schedule.warmup * total_steps))
    name, floor = schedule.name, schedule.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if name == "linear":
            return max(0.0, 1 - progress)
        if name == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


def optimizer_for(student: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over the student's trainable parameters."""
    spec = recipe.optimizer
    params = [p for p in student.parameters() if p.requires_grad]
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,
                               weight_decay=spec.weight_decay)
    cls = torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam
    return cls(params, lr=spec.lr, weight_decay=spec.weight_decay,
               betas=(spec.betas[0], spec.betas[1]), eps=spec.eps)


def device_of(recipe: Recipe) -> str:
    device = recipe.train.device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process (torchrun's environment; ``(0, 1)`` alone)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _drop_labels(module: nn.Module, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    kwargs.pop("labels", None)
    return args, kwargs


@contextmanager
def labels_kept_from(*models: nn.Module | None) -> Iterator[None]:
    """While open, the models are called without the batch's ``labels``: the adaptors read them
    (the positions the loss counts), but a model given labels would compute its own loss on
    the one position ``logits_to_keep=1`` leaves it."""
    handles = [m.register_forward_pre_hook(_drop_labels, with_kwargs=True)
               for m in models if m is not None]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def training_config(recipe: Recipe, output_dir: Path, total_steps: int) -> Any:
    import purekd

    train, metrics = recipe.train, recipe.metrics
    log_dir = None
    if "tensorboard" in metrics.sinks:
        log_dir = metrics.log_dir or str(output_dir / "tensorboard")
    fsdp = None
    if train.fsdp:
        fsdp = purekd.FSDPConfig(teacher="none" if recipe.teacher.source == "cache" else "shard")
    every = recipe.checkpoint.every
    return purekd.TrainingConfig(
        output_dir=str(output_dir), device=device_of(recipe),
        ckpt_steps=every if every is not None else total_steps if train.steps else None,
        gradient_accumulation_steps=train.accumulation, bf16=train.bf16, fsdp=fsdp,
        log_dir=log_dir)


def metric_sinks(recipe: Recipe) -> list[Any]:
    """The W&B and MLflow sinks the recipe names, built on rank 0 only (the runner writes
    ``metrics.jsonl`` itself and TensorBoard from ``TrainingConfig.log_dir``)."""
    from purekd.runner import metric_sink

    metrics = recipe.metrics
    if world()[0] != 0:
        return []
    sinks = []
    if "wandb" in metrics.sinks:
        options = {**({"project": metrics.project} if metrics.project else {}), **metrics.wandb}
        sinks.append(metric_sink("wandb", **options))
    if "mlflow" in metrics.sinks:
        options = {**({"experiment": metrics.project} if metrics.project else {}),
                   **metrics.mlflow}
        sinks.append(metric_sink("mlflow", **options))
    return sinks


class _Texts(Dataset):
    """The training rows' texts (one record a row), for the cross-tokenizer collator."""

    def __init__(self, rows: Rows, tokenizer: Any):
        self.rows, self.tokenizer = rows, tokenizer

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> str:
        return str(self.tokenizer.decode(self.rows.ids[index], skip_special_tokens=True))


def loader_for(rows: Rows, recipe: Recipe, cache: Any, pad_id: int, *,
               tokenizers: tuple[Any, Any] | None = None) -> DataLoader:
    """The training loader: this rank's batches (:class:`RankBatches`), padded, with the cached
    teacher beside each row when there is a cache."""
    from purekd.teacher_cache import CachedCollate, CachedTeacherDataset

    rank, size = world()
    data: Any = RowDataset(rows)
    collate: Any = PadCollate(pad_id) if rows.prompts is None else PromptCollate(pad_id)
    if tokenizers is not None:  # each side tokenises the text itself; the spans align them
        from purekd.stages import CrossTokenizerCollator

        data = _Texts(rows, tokenizers[0])
        collate = CrossTokenizerCollator(*tokenizers, max_length=recipe.data.seq_len)
    if cache is not None:
        data, collate = CachedTeacherDataset(data, cache), CachedCollate(collate)
    batches = RankBatches(len(data), recipe.train.batch_size, seed=recipe.train.seed, rank=rank,
                          world_size=size)
    return DataLoader(data, batch_sampler=batches, generator=batches.generator,
                      collate_fn=collate)


def train_student(student: Any, rows: Rows, recipe: Recipe, output_dir: Path, *,
                  teacher: Any = None, cache: Any = None, pad_id: int = 0,
                  callback: Callable[..., Any] | None = None,
                  on_start: Callable[[Any, Any], None] | None = None,
                  tokenizer: Any = None, tokenizer_T: Any = None) -> Any:
    """Train ``student`` in place by ``recipe`` on ``rows``, from the live ``teacher`` or the
    top-k ``cache``; returns the distiller (its ``runner.counters`` say where training
    ended). ``callback(model=, step=)`` runs after each checkpoint; ``on_start(distiller,
    optimizer)`` right before training (the progress bar attaches there). On-policy
    (``teacher.source: on_policy``) ``rows`` carry their prompts and the ``tokenizer`` gives
    the default stop and padding tokens. ``tokenizer_T``: the teacher's own tokenizer (a
    cross-tokenizer run: each record's text tokenised by both and aligned, ``gold`` or
    ``uld`` on the two sides' logits)."""
    import purekd
    from purekd.integrations import hf_adaptor

    if (teacher is None) == (cache is None):
        raise ValueError("train_student: give the live teacher or its cache (one of them)")
    cross = tokenizer_T is not None
    loader = loader_for(rows, recipe, cache, pad_id,
                        tokenizers=(tokenizer, tokenizer_T) if cross else None)
    train = recipe.train
    total = train.steps if train.steps is not None else (
        len(loader) // train.accumulation * (train.epochs or 1))
    hidden = bool(recipe.loss.matches)

    def adaptor(model: Any) -> Any:  # the fused output layer (gathered whole under FSDP2)
        return hf_adaptor(causal=True, lm_head=model.get_output_embeddings(),
                          labels_key="labels", hidden=hidden)

    adaptor_S = adaptor(student)
    adaptor_T = hf_adaptor(causal=True) if teacher is None else adaptor(teacher)
    model_args: dict[str, Any] = {"output_hidden_states": True, "logits_to_keep": 1}
    vocabulary_map = None
    if cross:  # the aligned losses read both sides' (B, L, V) logits
        adaptor_S = adaptor_T = hf_adaptor()
        model_args = {}
        if recipe.loss.kd_loss_type == "gold":
            from purekd.stages import vocabulary_map as build_map

            vocabulary_map = build_map(tokenizer, tokenizer_T)
    distiller = purekd.GeneralDistiller(training_config(recipe, output_dir, total),
                                        distill_config(recipe, tokenizer), teacher, student,
                                        adaptor_T,
                                        adaptor_S,
                                        compile="auto" if train.compile is None else train.compile,
                                        vocabulary_map=vocabulary_map)
    if recipe.loss.ce_weight:
        distiller.step = distiller.step.replace_term("kd_loss", kd_and_text_term(recipe.loss))
    optimizer = optimizer_for(student, recipe)
    checkpoint = recipe.checkpoint
    if on_start is not None:
        on_start(distiller, optimizer)
    with distiller, labels_kept_from(student, teacher):
        distiller.train(
            optimizer, loader, num_steps=train.steps, num_epochs=train.epochs,
            max_grad_norm=train.max_grad_norm if train.max_grad_norm > 0 else -1.0,
            scheduler_class=torch.optim.lr_scheduler.LambdaLR,
            scheduler_args={"lr_lambda": lr_factor(recipe.schedule, total)},
            callback=callback, progress_bar=False, save_state=checkpoint.save_state,
            keep_last_states=checkpoint.keep_last,
            resume_from=str(output_dir) if checkpoint.resume else None,
            metric_sinks=metric_sinks(recipe), **model_args)
    return distiller


__all__ = ["distill_config", "distill_config_of", "kd_and_text_term", "labels_kept_from",
           "loader_for", "lr_factor", "metric_sinks", "on_policy_config", "optimizer_for",
           "train_student", "training_config", "world"]
