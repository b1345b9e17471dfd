"""``purekd distill RECIPE.yaml``: a validated recipe run end to end.

1. the process group when launched by torchrun (before the cache, which every rank writes a
   share of);
2. the teacher and its tokenizer (or the recipe's tokenizer), the student (a model of its own,
   or the teacher with only some of its decoder layers), the same vocabulary on both sides;
3. the data: token rows and their loss labels, the held-out rows;
4. the teacher's top-k cache (``teacher.source: cache``; then the teacher leaves memory), or
   the records' prompts for on-policy sampling (``teacher.source: on_policy``), or the two
   tokenizers' alignment (``teacher.tokenizer``);
5. training (:func:`._train.train_student`), a ``save_pretrained`` student beside every
   ``gs{N}.pkl`` checkpoint and at the end in ``OUTPUT_DIR/student``;
6. the summary: steps, tokens, time, where the student is, held-out perplexity.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._convert import unstructure
from ._paths import resolve
from ._progress import Progress, Summary
from ._schema import Recipe


def check_loss(recipe: Recipe) -> None:
    """The loss's own checks (``DistillationConfig``, the KD term; a divergence registered with
    ``purekd.losses.register_divergence`` is known only here), before anything loads: a
    :class:`RecipeError` naming ``loss``."""
    from ._convert import RecipeError
    from ._train import distill_config, kd_and_text_term

    try:
        distill_config(recipe)
        if recipe.loss.ce_weight:
            kd_and_text_term(recipe.loss)
    except (ValueError, TypeError) as error:
        raise RecipeError([f"loss: {error}"]) from None


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_models(recipe: Recipe, *, progress_bar: bool = True) -> tuple[Any, Any, Any]:
    """``(teacher, student, tokenizer)``: the teacher in eval mode (no gradients), the student
    in train mode (float32; embeddings frozen when asked), the tokenizer — checked to share one
    vocabulary."""
    from ._models import check_same_vocabulary, compress, load_teacher, spread_layers

    teacher: Any
    student: Any
    teacher, tokenizer, _ = load_teacher(resolve(recipe.teacher.path), progress_bar=progress_bar)
    if recipe.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(resolve(recipe.tokenizer)))
    if recipe.teacher.tokenizer is not None:  # two tokenizers: the vocabularies differ
        from ._models import load_student

        assert recipe.student.path is not None  # (the checks)
        return teacher, load_student(resolve(recipe.student.path)), tokenizer
    spec = recipe.student
    if spec.path is not None:
        from ._models import load_student

        student = load_student(resolve(spec.path))
    else:
        from ._models import decoder_layers

        total = len(decoder_layers(teacher))
        layers = (spread_layers(total, spec.layers) if isinstance(spec.layers, int)
                  else list(spec.layers or []))
        student = compress(teacher, layers)
    if spec.freeze_embeddings:  # tied: the input embeddings may be the output layer
        student.get_input_embeddings().weight.requires_grad_(False)
        student.get_output_embeddings().weight.requires_grad_(False)
    check_same_vocabulary(teacher, student, tokenizer)
    return teacher, student, tokenizer


def teacher_tokenizer(recipe: Recipe) -> Any:
    """The teacher's own tokenizer (``teacher.tokenizer``), or ``None``."""
    if recipe.teacher.tokenizer is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve(recipe.teacher.tokenizer)))


def pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def export_callback(output_dir: Path, tokenizer: Any, sharded: bool) -> Callable[..., Any]:
    """``callback(model, step)``: the student as ``OUTPUT_DIR/student-gs{step}``."""
    from ._export import save_pretrained_student

    def callback(model: Any, step: int) -> None:
        save_pretrained_student(model, output_dir / f"student-gs{step}", tokenizer=tokenizer,
                                sharded=sharded)

    return callback


def run(recipe: Recipe, *, progress_bar: bool | None = None,
        echo: Callable[[str], None] = print) -> Summary:
    """Run ``recipe``; returns its :class:`Summary` (also printed by rank 0 through
    ``echo``)."""
    from ._data import build
    from ._export import save_pretrained_student
    from ._models import masked_perplexity
    from ._teacher import teacher_cache
    from ._train import device_of, train_student, world

    check_loss(recipe)
    rank, size = world()
    say = echo if rank == 0 else (lambda _: None)
    if size > 1:
        from purekd.runner._distributed import ensure_process_group

        ensure_process_group(device_of(recipe))
    seed_everything(recipe.train.seed)
    output_dir = Path(recipe.checkpoint.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (output_dir / "recipe.json").write_text(json.dumps(unstructure(recipe), indent=2))

    say(f"teacher: {recipe.teacher.path}")
    teacher, student, tokenizer = load_models(recipe, progress_bar=progress_bar is not False)
    on_policy = recipe.teacher.source == "on_policy"
    settings = recipe.on_policy
    split = build(recipe.data, tokenizer, prompts=on_policy,
                  prompt_tokens=settings.prompt_tokens if settings is not None else None,
                  need_labels=not on_policy or (settings is not None and settings.lmbda < 1))
    say(f"data: {len(split.train)} training rows"
        + (f", {len(split.held_out)} held-out rows" if split.held_out is not None else "")
        + f" ({split.tokens:,} tokens read)")
    cache = None
    if recipe.teacher.source == "cache":
        from ._data import RowDataset

        folder = Path(recipe.teacher.cache_dir or output_dir / "teacher_cache")
        say(f"teacher cache: top-{recipe.teacher.k} in {folder}")
        cache = teacher_cache(teacher, tokenizer, RowDataset(split.train), folder,
                              k=recipe.teacher.k, values=recipe.teacher.cache_values,
                              batch_size=recipe.train.batch_size, progress_bar=progress_bar,
                              rank=rank, world_size=size, pad_id=pad_id(tokenizer))
        teacher = None  # training needs only the cache
    before = None
    held = split.held_out
    if held is not None and not any(bool((t[1:] != -100).any()) for t in held.labels):
        say("held-out rows without a completion (prompts alone): no held-out perplexity")
        held = None
    if held is not None:
        before = masked_perplexity(student, held.ids, held.labels, pad_id(tokenizer)).perplexity
    seed_everything(recipe.train.seed)
    progress = Progress(recipe.train.steps, enabled=progress_bar if progress_bar is not None
                        else recipe.metrics.progress_bar, world_size=size, rank=rank)
    sharded = recipe.train.fsdp
    callback = (export_callback(output_dir, tokenizer, sharded)
                if recipe.checkpoint.save_pretrained else None)

    def on_start(distiller: Any, optimizer: Any) -> None:
        progress.attach(distiller.step, optimizer)

    try:
        distiller = train_student(student, split.train, recipe, output_dir, teacher=teacher,
                                  cache=cache, pad_id=pad_id(tokenizer), callback=callback,
                                  on_start=on_start, tokenizer=tokenizer,
                                  tokenizer_T=teacher_tokenizer(recipe))
    finally:
        progress.close()
    steps = distiller.runner.counters.global_step
    student_dir = None
    if recipe.checkpoint.save_pretrained:
        written = save_pretrained_student(student, output_dir / "student", tokenizer=tokenizer,
                                          sharded=sharded)
        student_dir = str(written or output_dir / "student")
    after = None
    if held is not None:
        after = masked_perplexity(student, held.ids, held.labels, pad_id(tokenizer)).perplexity
    summary = Summary(steps, progress.tokens, progress.seconds(), student_dir, str(output_dir),
                      after, before)
    say(summary.text())
    if rank == 0:
        (output_dir / "summary.json").write_text(json.dumps(summary._asdict(), indent=2))
    return summary


__all__ = ["check_loss", "load_models", "run", "seed_everything"]
