"""`purekd demo lm`'s distilled run goes through the recipe path: the same student weights, bit
for bit, as the demo's own code before it did (kept here as the reference), on tiny models —
over more than one epoch of the shuffled loader; its settings are the shipped ``demo-lm``
recipe.

Both sides run with ``compile=False``: the default ``"auto"`` decides by timing the first steps,
so two runs of the same code may differ in the last bits (6e-8 measured) when one compiles the
loss path and the other does not."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch.utils.data import DataLoader

import purekd
from purekd.demo import lm
from purekd.demo._lm_run import Rows, seed_everything
from purekd.recipes import _convert, read_yaml, shipped_path

from . import _tiny

SETTINGS = lm.Settings(verses=40, length=16, train_rows=20, held_out_rows=2, batch_size=4,
                       steps=7, layers=2, k=8, lr=1e-2, warmup=0.2)


# -- the demo's code before the recipe path (verbatim but for names) -------------------------


def _old_loader(dataset, settings, collate=None, shuffle=True):
    return DataLoader(dataset, batch_size=settings.batch_size, shuffle=shuffle, drop_last=shuffle,
                      collate_fn=collate, generator=torch.Generator().manual_seed(settings.seed))


def _old_cache(teacher, tokenizer, rows, folder, settings):
    from purekd.teacher_cache import (
        TeacherCache,
        WithSampleIds,
        fingerprint_model,
        write_teacher_cache,
    )

    def adaptor(batch: Mapping[str, torch.Tensor], outputs: Any) -> dict[str, Any]:
        return {"logits": outputs.logits}

    fingerprint = fingerprint_model(teacher)
    vocabulary = lm.vocabulary_size(teacher)
    write_teacher_cache(
        teacher, adaptor, _old_loader(WithSampleIds(Rows(rows)), settings, shuffle=False),
        folder, k=settings.k, values="float32", vocab_size=vocabulary, tokenizer=tokenizer,
        teacher_fingerprint=fingerprint, device="cpu", progress_bar=False)
    return TeacherCache(folder, vocab_size=vocabulary, k=settings.k, tokenizer=tokenizer,
                        teacher=fingerprint)


def _old_lr_lambda(settings):
    warmup = max(1, round(settings.warmup * settings.steps))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1 - (step - warmup) / max(1, settings.steps - warmup))

    return factor


def _old_train_distilled(student, rows, cache, out: Path, settings):
    from purekd.integrations import hf_adaptor
    from purekd.teacher_cache import CachedCollate, CachedTeacherDataset

    data = CachedTeacherDataset(Rows(rows), cache)
    adaptor_S = hf_adaptor(causal=True, lm_head=student.get_output_embeddings(),
                           labels_key="input_ids")
    loss: Any = ["forward_kl", {"tail": True}] if settings.tail else "forward_kl"
    config = purekd.DistillationConfig(kd_loss_type=loss, temperature=settings.temperature,
                                       kd_loss_weight=1, hard_label_weight=0)
    distiller = purekd.GeneralDistiller(
        purekd.TrainingConfig(output_dir=str(out), device="cpu", ckpt_steps=settings.steps),
        config, None, student, hf_adaptor(causal=True), adaptor_S, compile=False)
    if settings.ce_weight:
        term = purekd.terms.token_kd("forward_kl", temperature=settings.temperature,
                                     params={"tail": settings.tail},
                                     ce_weight=settings.ce_weight,
                                     weight=1 / (1 + settings.ce_weight))
        distiller.step = distiller.step.replace_term("kd_loss", term)
    params = [p for p in student.parameters() if p.requires_grad]
    with distiller:
        distiller.train(torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0),
                        _old_loader(data, settings, CachedCollate()),
                        num_steps=settings.steps, max_grad_norm=1.0,
                        scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                        scheduler_args={"lr_lambda": _old_lr_lambda(settings)},
                        progress_bar=False, output_hidden_states=True, logits_to_keep=1)


# -- the test ------------------------------------------------------------------------------


def _setting_up():
    tok = _tiny.tokenizer()
    teacher = _tiny.llama(len(tok)).requires_grad_(False)
    text = "\n".join(_tiny.LINES * 6)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rows = torch.tensor(ids[:SETTINGS.train_rows * SETTINGS.length]).view(
        SETTINGS.train_rows, SETTINGS.length)
    return tok, teacher, rows


def test_the_recipe_path_trains_the_demo_student_bit_for_bit_as_before(tmp_path):
    tok, teacher, rows = _setting_up()
    for settings in (SETTINGS, SETTINGS._replace(ce_weight=0.0),
                     SETTINGS._replace(tail=True, freeze_embeddings=True)):
        old_cache = _old_cache(teacher, tok, rows, tmp_path / "old" / "cache", settings)
        new_cache = lm.teacher_cache(teacher, tok, rows, tmp_path / "new" / "cache", settings,
                                     False)
        for i in range(len(rows)):
            a, b = old_cache[i], new_cache[i]
            assert torch.equal(a.topk_ids, b.topk_ids)
            assert torch.equal(a.topk_logprobs, b.topk_logprobs)

        students = []
        for which, cache in (("old", old_cache), ("new", new_cache)):
            student = lm.compress(teacher, lm.spread_layers(4, settings.layers))
            if settings.freeze_embeddings:
                student.get_input_embeddings().weight.requires_grad_(False)
            seed_everything(settings.seed)
            out = tmp_path / which / "distilled"
            if which == "old":
                _old_train_distilled(student, rows, cache, out, settings)
            else:
                recipe = lm.recipe_for(settings, tmp_path / which)
                recipe = attrs.evolve(recipe, train=attrs.evolve(recipe.train, compile=False))
                lm.train_distilled(student, rows, cache, out, settings, False, recipe=recipe)
            students.append(student.state_dict())
        old, new = students
        assert old.keys() == new.keys()
        for name in old:
            assert torch.equal(old[name], new[name]), (settings, name)
        assert not torch.equal(old["model.layers.0.mlp.up_proj.weight"],
                               teacher.model.layers[0].mlp.up_proj.weight)  # it trained
        for folder in ("old", "new"):
            import shutil

            shutil.rmtree(tmp_path / folder)


def test_the_demos_settings_are_the_shipped_demo_lm_recipe():
    shipped, problems = _convert.structure(read_yaml(shipped_path("demo-lm")))
    assert problems == []
    mine = lm.recipe_for(lm.DEFAULT, "purekd-demo-lm")
    # the demo keeps its cache beside the two students; otherwise the very same recipe
    assert mine.teacher == attrs.evolve(shipped.teacher, cache_dir="purekd-demo-lm/teacher_cache")
    for section in ("student", "data", "loss", "optimizer", "schedule", "train", "checkpoint",
                    "metrics"):
        assert getattr(mine, section) == getattr(shipped, section), section
