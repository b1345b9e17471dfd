"""Cross-tokenizer batches (``CrossTokenizerCollator``) through the Hugging Face
``DistillationTrainer``: the ``AlignedSpans`` reach the step intact, ``token_level=True`` counts
the aligned spans, and one optimizer step over two accumulated micro-batches of unequal span
counts equals SGD on the aligned loss of the whole batch (float64, 1e-10); without
``token_level`` it is the mean of the micro-batches' means, as ``make_step`` gives them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import purekd
from purekd import losses
from purekd.stages import CrossTokenizerCollator

from ..terms.test_cross_tokenizer_kd import (
    TEMPERATURE,
    TEXTS,
    adaptor,
    by_hand,
    models,
    sgd_by_hand,
)
from ..terms.test_cross_tokenizer_kd import pair as _pair_fixture

pair = _pair_fixture  # the fixture, under the name the tests take

transformers = pytest.importorskip("transformers")
from purekd.integrations.hf_trainer import (  # noqa: E402
    DistillationTrainer,
    count_label_tokens,
)


def _arguments(tmp_path: Path, accumulation: int, batch_size: int) -> Any:
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, train_sampling_strategy="sequential",
        lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=True, seed=0,
        save_strategy="no", report_to="none", logging_strategy="no", disable_tqdm=True,
        per_device_eval_batch_size=len(TEXTS))


def _train(tmp_path: Path, pair: Any, loss: str, params: dict[str, Any], accumulation: int,
           token_level: bool) -> tuple[dict[str, torch.Tensor], DistillationTrainer]:
    tokenizer_S, tokenizer_T, vmap = pair
    teacher, student = models(pair)
    config = purekd.DistillationConfig(kd_loss_type=[loss, params] if params else loss,
                                       temperature=TEMPERATURE)
    step = purekd.make_step(config, teacher, student, adaptor, adaptor, compile=False,
                            vocabulary_map=vmap if loss == "gold" else None)
    trainer = DistillationTrainer(
        step, _arguments(tmp_path, accumulation, len(TEXTS) // accumulation),
        train_dataset=TEXTS, data_collator=CrossTokenizerCollator(tokenizer_S, tokenizer_T),
        token_level=token_level,
        optimizers=(torch.optim.SGD(step.parameters(), lr=0.5), None))
    trainer.train()
    return {k: p.detach().clone() for k, p in student.named_parameters()}, trainer


CASES = [("gold", {"beta": 0.9, "matched_weight": 1.0, "unmatched_weight": 0.5}), ("uld", {})]


@pytest.mark.parametrize(("loss", "params"), CASES)
@pytest.mark.parametrize("accumulation", [1, 2])
def test_token_level_accumulation_is_sgd_on_the_aligned_loss_of_all_spans(tmp_path, pair, loss,
                                                                          params, accumulation):
    expected = sgd_by_hand(pair, loss, params, lr=0.5)
    got, trainer = _train(tmp_path, pair, loss, params, accumulation, token_level=True)
    assert len(trainer.train_losses) == accumulation
    start = dict(models(pair)[1].named_parameters())
    assert max((got[k] - start[k]).abs().max().item() for k in got) > 1e-4  # the weights moved
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-12)


def test_without_token_level_each_micro_batch_is_its_own_mean(tmp_path, pair):
    tokenizer_S, tokenizer_T, vmap = pair
    got, _ = _train(tmp_path, pair, "uld", {}, 2, token_level=False)
    teacher, student = models(pair)
    collate = CrossTokenizerCollator(tokenizer_S, tokenizer_T)
    halves = [collate(TEXTS[:2]), collate(TEXTS[2:])]
    assert halves[0]["spans"].weight.sum() != halves[1]["spans"].weight.sum()
    mean = sum(by_hand("uld", student, teacher, h, vmap, {}) for h in halves) / 2
    mean.backward()  # type: ignore[union-attr]
    for key, p in student.named_parameters():
        torch.testing.assert_close(got[key], (p - 0.5 * p.grad).detach(), rtol=1e-10,
                                   atol=1e-12)
    # which differs from the token-level step
    tokens = sgd_by_hand(pair, "uld", {}, lr=0.5)
    assert max((got[k] - tokens[k]).abs().max().item() for k in got) > 1e-6


def test_the_spans_reach_the_step_intact_and_are_counted(tmp_path, pair):
    tokenizer_S, tokenizer_T, vmap = pair
    batch = CrossTokenizerCollator(tokenizer_S, tokenizer_T)(TEXTS)
    assert count_label_tokens(batch) == batch["spans"].weight.sum() > 10
    _, trainer = _train(tmp_path, pair, "gold", {}, 1, token_level=True)
    moved = trainer._prepare_inputs(batch)
    assert isinstance(moved["spans"], losses.AlignedSpans)
    for got, want in zip(moved["spans"], batch["spans"], strict=True):
        assert torch.equal(got, want) and got.dtype == want.dtype
    # evaluate(): the step's loss on the eval set, one batch of every text
    teacher, student = trainer.step.teachers["teacher"], trainer.step.student
    metrics = trainer.evaluate(eval_dataset=TEXTS)
    expected = by_hand("gold", student, teacher, batch, vmap, {})
    assert metrics["eval_loss"] == pytest.approx(float(expected.detach()), rel=1e-10)


@pytest.mark.parametrize("token_level", [False, True])
def test_on_policy_across_tokenizers_through_the_trainer_is_sgd_on_the_step_loss(tmp_path,
                                                                                 token_level):
    from purekd.integrations import hf_adaptor
    from purekd.stages import vocabulary_map

    from ..combinators.test_on_policy_cross_tokenizer import (
        PROMPTS,
        _config,
        _models,
        _prompts,
        characters,
        wordpiece_any,
    )

    tokenizers = (wordpiece_any(), characters())
    vmap = vocabulary_map(tokenizers[1], tokenizers[0])

    def step_of(models: Any) -> purekd.Step:
        return purekd.make_step(_config("gold"), *models, hf_adaptor(causal=True),
                                hf_adaptor(causal=True), compile=False, tokenizers=tokenizers,
                                vocabulary_map=vmap)

    models_ = _models(tokenizers)
    loss = step_of(models_)(_prompts(tokenizers[1])).loss
    grads = torch.autograd.grad(loss, list(models_[1].parameters()))
    expected = {k: (p - 0.3 * g).detach()
                for (k, p), g in zip(models_[1].named_parameters(), grads, strict=True)}
    models_ = _models(tokenizers)
    step = step_of(models_)
    trainer = DistillationTrainer(
        step, _arguments(tmp_path, 1, len(PROMPTS)), train_dataset=list(range(len(PROMPTS))),
        data_collator=lambda items: _prompts(tokenizers[1]), token_level=token_level,
        tokenizers=tokenizers, processing_class=tokenizers[1],
        optimizers=(torch.optim.SGD(step.parameters(), lr=0.3), None))
    trainer.train()
    assert trainer.train_losses == [pytest.approx(float(loss.detach()), rel=1e-12)]
    # token_level: the gradient of loss * spans, divided by the spans afterwards; the float64
    # Llama's float32 RMSNorm rounds that order differently (about 2e-7 relative)
    tolerance = {"rtol": 1e-6, "atol": 1e-9} if token_level else {"rtol": 1e-10, "atol": 1e-12}
    for key, p in models_[1].named_parameters():
        torch.testing.assert_close(p.detach(), expected[key], **tolerance)
