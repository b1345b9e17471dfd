"""``hf_adaptor`` on a cross-tokenizer teacher cache: it passes on every key the cache's batch
carries (``topk_ids``, ``topk_logprobs``, ``topk_mask``, ``topk_next_logprobs``,
``topk_vocab_size``), so that ``make_step`` and ``GeneralDistiller`` trained from the cache with
``hf_adaptor`` on both sides equal the live teacher's run at ``k = V`` (loss and gradients, and
the trained weights, to 1e-6 as documented in docs/cross-tokenizer.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import purekd
from purekd._keys import TOPK_KEYS
from purekd.integrations import hf_adaptor
from purekd.stages import CrossTokenizerCollator, vocabulary_map
from purekd.teacher_cache import (
    CrossTokenizerCachedCollate,
    CrossTokenizerCachedDataset,
    TeacherCache,
)

from ..teacher_cache.test_cross_tokenizer import (
    TEXTS,
    CausalLM,
    assert_cached_step_is_live,
    cached_batches,
    write,
)

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair() -> tuple[Any, Any]:
    from ..stages import _tokenizers
    from ..stages.test_cross_batches import characters

    return _tokenizers.wordpiece(), characters()


def test_hf_adaptor_passes_every_key_of_the_cross_cache(pair, tmp_path):
    _, tokenizer_T = pair
    write(CausalLM(len(tokenizer_T), seed=0), pair, tmp_path, k=3)
    (batch,) = cached_batches(pair, tmp_path)
    cached = batch["teacher_cache"]
    assert set(cached) == set(TOPK_KEYS)  # what the cross cache's batch carries
    adapted = hf_adaptor(causal=True)(batch["teacher"], cached)
    for key in TOPK_KEYS:
        assert key in adapted, key
        value = adapted[key]
        assert value is cached[key] or torch.equal(value, cached[key]), key
    # the cached rows are the teacher's own tokenisation: no mask of the student's batch
    # (another length) is attached to them
    assert "logits_mask" not in adapted and "inputs_mask" not in adapted
    normalised = purekd.stages.normalise(adapted)
    assert normalised.topk_vocab_size == len(tokenizer_T)
    assert normalised.topk_next_logprobs is cached["topk_next_logprobs"]


@pytest.mark.parametrize(("loss", "params"), [("uld", {}), ("gold", {}),
                                              ("gold", {"beta": 0.9, "top_k": 5})])
def test_make_step_from_the_cache_with_hf_adaptor_is_the_live_step(pair, tmp_path, loss, params):
    tokenizer_S, tokenizer_T = pair
    teacher = CausalLM(len(tokenizer_T), seed=0)
    student = CausalLM(len(tokenizer_S), seed=1)
    write(teacher, pair, tmp_path, k=len(tokenizer_T))
    config = {"kd_loss_type": [loss, params] if params else loss, "temperature": 1.0}
    options = {"vocabulary_map": vocabulary_map(tokenizer_S, tokenizer_T)} if loss == "gold" else {}
    adaptor = hf_adaptor(causal=True)
    live_step = purekd.make_step(config, teacher, student, adaptor, adaptor, compile=False,
                                 **options)
    cached_step = purekd.make_step(config, None, student, adaptor, adaptor, compile=False,
                                   **options)
    assert_cached_step_is_live(live_step, cached_step, student, pair, tmp_path)


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_general_distiller_from_the_cache_with_hf_adaptor_ends_with_the_live_weights(
        pair, tmp_path: Path, loss):
    tokenizer_S, tokenizer_T = pair
    teacher = CausalLM(len(tokenizer_T), seed=0)
    write(teacher, pair, tmp_path / "cache", k=len(tokenizer_T))
    options = {"vocabulary_map": vocabulary_map(tokenizer_S, tokenizer_T)} if loss == "gold" else {}
    adaptor = hf_adaptor(causal=True)

    def run(model_T: Any, loader: DataLoader, name: str) -> torch.nn.Module:
        student = CausalLM(len(tokenizer_S), seed=1)
        distiller = purekd.GeneralDistiller(
            purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path / name)),
            purekd.DistillationConfig(kd_loss_type=loss, temperature=1.0), model_T, student,
            adaptor, adaptor, compile=False, **options)
        with distiller:
            distiller.train(torch.optim.SGD(student.parameters(), lr=0.5), loader, num_epochs=2)
        return student

    live = run(teacher, DataLoader(TEXTS, batch_size=2, collate_fn=CrossTokenizerCollator(
        tokenizer_S, tokenizer_T)), "live")
    cache = TeacherCache(tmp_path / "cache", student_tokenizer=tokenizer_S)
    cached = run(None, DataLoader(CrossTokenizerCachedDataset(TEXTS, cache, tokenizer_S),
                                  batch_size=2,
                                  collate_fn=CrossTokenizerCachedCollate(tokenizer_S)), "cached")
    start = CausalLM(len(tokenizer_S), seed=1)
    assert max((a - b).abs().max().item()
               for a, b in zip(live.parameters(), start.parameters(), strict=True)) > 1e-3
    for a, b in zip(cached.parameters(), live.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
