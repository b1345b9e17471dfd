"""Issue 20's bad input on the routes the first tests did not cover: a slow tokenizer (no offset
mapping) at every entry point that aligns — the cache's collates and on-policy across tokenizers,
refused when built, naming the tokenizer and the fix; a batch without any aligned span through
the top-k losses, a step from a cross-tokenizer cache and a distiller's training — loss 0, finite
(zero) gradients, the weights unchanged, and ``align_spans``' counted warning."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import purekd
from purekd import losses
from purekd.integrations import hf_adaptor
from purekd.stages import CrossTokenizerCollator, batches_without_spans, vocabulary_map
from purekd.teacher_cache import (
    CrossTokenizerCachedCollate,
    CrossTokenizerCachedDataset,
    TeacherCache,
    TeacherTextCollate,
)

from .stages import _tokenizers
from .stages.test_cross_batches import characters
from .teacher_cache.test_cross_tokenizer import CausalLM, write

pytest.importorskip("transformers")

SLOW = (r"^the {side} tokenizer BertTokenizerLegacy gives no offset mapping \(it is a slow, "
        r"Python tokenizer\), and cross-tokenizer alignment needs each token's character "
        r"offsets: load the fast tokenizer instead, AutoTokenizer.from_pretrained\('\.\.\.', "
        r"use_fast=True\)")


@pytest.fixture(scope="module")
def pair() -> tuple[Any, Any]:
    return _tokenizers.wordpiece(), characters()


def test_a_slow_tokenizer_is_refused_by_the_cache_collates(tmp_path):
    slow = _tokenizers.slow_wordpiece(tmp_path)
    with pytest.raises(ValueError, match=SLOW.format(side="teacher")):
        TeacherTextCollate(slow)
    with pytest.raises(ValueError, match=SLOW.format(side="student")):
        CrossTokenizerCachedCollate(slow)


def test_a_slow_tokenizer_is_refused_when_the_on_policy_step_is_built(tmp_path):
    from .combinators.test_on_policy_cross_tokenizer import _config, _models, wordpiece_any

    fast_T, slow_S = wordpiece_any(), _tokenizers.slow_wordpiece(tmp_path)
    teacher, _ = _models((fast_T, characters()))
    from tests._on_policy import tiny_llama

    student = tiny_llama(1, 8, seed=1, vocab=len(slow_S), context=64)
    with pytest.raises(ValueError, match=SLOW.format(side="student")):
        purekd.make_step(_config("uld"), teacher, student, hf_adaptor(causal=True),
                         hf_adaptor(causal=True), compile=False, tokenizers=(fast_T, slow_S))


def _no_span(fn: Any) -> Any:
    """``fn()``, asserting it warned once that a batch had no aligned span, and counted it."""
    before = batches_without_spans()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    assert batches_without_spans() == before + 1
    assert sum("align_spans: no aligned span in this batch" in str(w.message)
               for w in caught) == 1
    return result


TEXTS = ["light", "in"]  # one student token each: no row predicts it, so no span
FULL = ["let there be light.", "in the beginning god created the heaven."]


def test_no_span_through_the_top_k_losses(pair, tmp_path):
    tokenizer_S, tokenizer_T = pair
    write(CausalLM(len(tokenizer_T), seed=0), pair, tmp_path, k=3, texts=TEXTS)
    cache = TeacherCache(tmp_path, student_tokenizer=tokenizer_S)
    data = CrossTokenizerCachedDataset(TEXTS, cache, tokenizer_S)
    batch = _no_span(lambda: CrossTokenizerCachedCollate(tokenizer_S)([data[0], data[1]]))
    spans, cached = batch["spans"], batch["teacher_cache"]
    assert spans.weight.tolist() == [0.0]
    teacher = losses.TopkSpanTeacher(cached["topk_ids"], cached["topk_logprobs"],
                                     cached["topk_next_logprobs"], cached["topk_vocab_size"])
    length = batch["student"]["input_ids"].size(1)
    logits_S = torch.randn(2, length, len(tokenizer_S), requires_grad=True)
    vmap = vocabulary_map(tokenizer_S, tokenizer_T)
    for value in (losses.aligned_uld_topk(logits_S, teacher, spans),
                  losses.aligned_gold_topk(logits_S, teacher, spans, vmap),
                  losses.aligned_uld_topk(logits_S, teacher, spans, blockwise=False),
                  losses.aligned_gold_topk(logits_S, teacher, spans, vmap, blockwise=False)):
        (grad,) = torch.autograd.grad(value, logits_S)
        assert value.item() == 0.0 and torch.isfinite(grad).all() and not grad.any()


@pytest.mark.parametrize("loss", ["uld", "gold"])
@pytest.mark.parametrize("source", ["live", "cache"])
def test_no_span_through_a_distiller_leaves_the_weights_and_finishes(pair, tmp_path: Path,
                                                                      loss, source):
    tokenizer_S, tokenizer_T = pair
    teacher = CausalLM(len(tokenizer_T), seed=0)
    options = {"vocabulary_map": vocabulary_map(tokenizer_S, tokenizer_T)} if loss == "gold" else {}
    if source == "live":
        batch = _no_span(lambda: CrossTokenizerCollator(tokenizer_S, tokenizer_T)(TEXTS))
        model_T = teacher
    else:
        write(teacher, pair, tmp_path / "cache", k=4, texts=TEXTS)
        cache = TeacherCache(tmp_path / "cache", student_tokenizer=tokenizer_S)
        data = CrossTokenizerCachedDataset(TEXTS, cache, tokenizer_S)
        batch = _no_span(lambda: CrossTokenizerCachedCollate(tokenizer_S)([data[0], data[1]]))
        model_T = None
    student = CausalLM(len(tokenizer_S), seed=1)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    adaptor = hf_adaptor(causal=True)
    step = purekd.make_step({"kd_loss_type": loss, "temperature": 1.0}, model_T, student,
                            adaptor, adaptor, compile=False, **options)
    out = step(batch)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.tokens is not None and out.tokens.item() == 0
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and not g.any() for g in grads)
    # in a run: a step of such a batch changes nothing (plain SGD, a zero gradient) and raises
    # no non-finite-loss error. (A first step without a gradient is refused by the runner.)
    good = (CrossTokenizerCollator(tokenizer_S, tokenizer_T)(FULL) if source == "live"
            else None)
    if source == "cache":
        write(teacher, pair, tmp_path / "full", k=4, texts=FULL)
        cache = TeacherCache(tmp_path / "full", student_tokenizer=tokenizer_S)
        data = CrossTokenizerCachedDataset(FULL, cache, tokenizer_S)
        good = CrossTokenizerCachedCollate(tokenizer_S)([data[0], data[1]])

    def train(batches: list[Any], name: str) -> dict[str, torch.Tensor]:
        student = CausalLM(len(tokenizer_S), seed=1)
        distiller = purekd.GeneralDistiller(
            purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path / name)),
            purekd.DistillationConfig(kd_loss_type=loss, temperature=1.0), model_T, student,
            adaptor, adaptor, compile=False, **options)
        with distiller:
            distiller.train(torch.optim.SGD(student.parameters(), lr=0.5), batches,
                            num_steps=len(batches))
        return student.state_dict()

    once, then_none = train([good], "once"), train([good, batch], "then_none")
    assert any(not torch.equal(once[k], start[k]) for k in start)
    for key, value in then_none.items():
        assert torch.equal(value, once[key]), key
