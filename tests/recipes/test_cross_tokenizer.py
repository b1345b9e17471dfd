"""A recipe whose teacher has a tokenizer of its own (``teacher.tokenizer``): each record's
text tokenised by both tokenizers and aligned (``CrossTokenizerCollator``), ``gold`` (with the
vocabulary map) or ``uld`` on the two sides' logits; and the checks that keep the two-tokenizer
losses and a teacher tokenizer together."""

from __future__ import annotations

import math

import pytest

from purekd.recipes import RecipeError, validate
from purekd.recipes._run import run

from . import _tiny


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A teacher of a 280-token BPE (its own directory) and a student of the 300-token one."""
    root = tmp_path_factory.mktemp("pair")
    tok_T, tok_S = _tiny.tokenizer(280), _tiny.tokenizer(300)
    assert len(tok_T) != len(tok_S)
    teacher = _tiny.llama(len(tok_T), layers=2, seed=1)
    teacher.save_pretrained(root / "teacher")
    tok_T.save_pretrained(root / "teacher")
    student = _tiny.llama(len(tok_S), layers=1, seed=2)
    student.save_pretrained(root / "student")
    tok_S.save_pretrained(root / "student")
    return root


def _recipe(recipe_data, pair, tmp_path, **loss):
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recipe_data.items()}
    data["teacher"] = {"path": str(pair / "teacher"), "source": "live",
                       "tokenizer": str(pair / "teacher")}
    data["student"] = {"path": str(pair / "student")}
    data["tokenizer"] = str(pair / "student")
    data["data"] = {**recipe_data["data"], "packing": False, "seq_len": 24}
    data["loss"] = {"ce_weight": 0.0, **loss}
    data["train"] = {**recipe_data["train"], "steps": 2}
    data["checkpoint"] = {"output_dir": str(tmp_path / "cross"), "save_state": False}
    return data


@pytest.mark.parametrize("loss", [{"kd_loss_type": "gold", "beta": 0.5},
                                  {"kd_loss_type": "uld", "params": {"top_k": 16}}])
def test_a_teacher_of_another_tokenizer_distils_through_the_aligned_spans(recipe_data, pair,
                                                                         tmp_path, loss):
    import json

    import torch
    from transformers import AutoModelForCausalLM

    summary = run(validate(_recipe(recipe_data, pair, tmp_path, **loss)), progress_bar=False,
                  echo=lambda _: None)
    assert summary.steps == 2 and math.isfinite(summary.perplexity)
    out = tmp_path / "cross"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(math.isfinite(r["kd_loss"]) and r["kd_loss"] > 0
                                     for r in records)
    trained = AutoModelForCausalLM.from_pretrained(out / "student")
    before = AutoModelForCausalLM.from_pretrained(pair / "student")
    assert trained.config.vocab_size == 300
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight,
                           before.model.layers[0].mlp.up_proj.weight)


def _problems(data):
    with pytest.raises(RecipeError) as info:
        validate(data)
    return info.value.problems


def test_the_two_tokenizer_checks(recipe_data, pair, tmp_path):
    data = _recipe(recipe_data, pair, tmp_path, kd_loss_type="gold")
    same = {**data, "tokenizer": str(pair / "teacher")}
    assert _problems(same) == [
        f"teacher.tokenizer: {str(pair / 'teacher')!r} is also the student's tokenizer: a "
        "cross-tokenizer run needs two different ones; for one tokenizer remove "
        "teacher.tokenizer"]
    one_vocabulary = {**data, "loss": {"kd_loss_type": "forward_kl", "ce_weight": 0.0}}
    assert _problems(one_vocabulary) == [
        "loss.kd_loss_type: 'forward_kl' compares the two models' distributions id by id, but "
        "teacher.tokenizer gives the teacher a tokenizer of its own: use 'gold' or 'uld' "
        "(docs/cross-tokenizer.md), or remove teacher.tokenizer"]
    no_teacher_tokenizer = {**data, "teacher": {**data["teacher"], "tokenizer": None}}
    assert _problems(no_teacher_tokenizer) == [
        "loss.kd_loss_type: 'gold' aligns two tokenizations of the text: give the teacher's "
        "tokenizer as teacher.tokenizer and the student's as tokenizer (for one tokenizer use a "
        "divergence such as forward_kl)"]
    everything = {**data, "tokenizer": None,
                  "teacher": {**data["teacher"], "source": "cache"},
                  "student": {"layers": 1},
                  "data": {**data["data"], "packing": True},
                  "loss": {"kd_loss_type": "uld", "ce_weight": 1.0}}
    why = "(teacher.tokenizer: two tokenizers)"
    assert _problems(everything) == [
        "tokenizer: missing: with teacher.tokenizer (the teacher's) set, give the student's "
        "tokenizer here",
        f"teacher.source: 'cache' {why}: the teacher must run on its own tokenisation of each "
        "text; set teacher.source: live",
        f"student.layers: a student cut from the teacher has the teacher's tokenizer {why}: "
        "give student.path (a model of the student's tokenizer)",
        f"data.packing: true {why}: each record's text is tokenised by both tokenizers and "
        "aligned; set data.packing: false",
        f"loss.ce_weight: 1 {why}: the cross-entropy does not join the uld term; set 0"]
