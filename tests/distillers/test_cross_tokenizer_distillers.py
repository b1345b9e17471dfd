"""Cross-tokenizer distillation through MultiTaskDistiller (``vocabulary_map=``, validated as the
other distillers do) and on-policy across tokenizers through the distillers (``tokenizers=``):
one SGD step equals the step's loss by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import purekd
from purekd.integrations import hf_adaptor
from purekd.stages import CrossTokenizerCollator, vocabulary_map

from ..combinators.test_on_policy_cross_tokenizer import (
    _config,
    _models,
    _prompts,
    characters,
    wordpiece_any,
)
from ..stages import _tokenizers
from ..stages.test_cross_batches import characters as plain_characters
from ..terms.test_cross_tokenizer_kd import TEMPERATURE, TEXTS, TokenLM, adaptor, by_hand

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair() -> tuple[Any, Any, Any]:
    tokenizer_S, tokenizer_T = _tokenizers.wordpiece(), plain_characters()
    return tokenizer_S, tokenizer_T, vocabulary_map(tokenizer_S, tokenizer_T)


def _sgd(student: torch.nn.Module, loss: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(loss, list(student.parameters()))
    return {k: (p - lr * g).detach() for (k, p), g in zip(student.named_parameters(), grads,
                                                          strict=True)}


# ----------------------------------------------------------------------- MultiTaskDistiller
@pytest.mark.parametrize("loss", ["gold", "uld"])
def test_multi_task_one_cross_tokenizer_task_is_sgd_on_the_aligned_loss(tmp_path: Path, pair,
                                                                         loss):
    tokenizer_S, tokenizer_T, vmap = pair
    batch = CrossTokenizerCollator(tokenizer_S, tokenizer_T)(TEXTS)
    teacher, student = TokenLM(len(tokenizer_T), seed=0), TokenLM(len(tokenizer_S), seed=1)
    expected = _sgd(student, by_hand(loss, student, teacher, batch, vmap, {}), lr=0.5)
    distiller = purekd.MultiTaskDistiller(
        purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path)),
        purekd.DistillationConfig(kd_loss_type=loss, temperature=TEMPERATURE),
        {"cross": teacher}, student, {"cross": adaptor}, {"cross": adaptor}, compile=False,
        vocabulary_map=vmap if loss == "gold" else None)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.5), {"cross": [batch]},
                        num_steps=1)
    for key, value in expected.items():
        torch.testing.assert_close(dict(student.named_parameters())[key].detach(), value,
                                   rtol=1e-10, atol=1e-12)
    assert any(not torch.equal(value, p) for value, p in zip(
        expected.values(), TokenLM(len(tokenizer_S), seed=1).parameters(), strict=True))


def test_multi_task_uld_mixes_a_cross_tokenizer_task_and_a_one_vocabulary_task(tmp_path, pair):
    tokenizer_S, tokenizer_T, _ = pair
    cross = CrossTokenizerCollator(tokenizer_S, tokenizer_T)(TEXTS)
    same = {"input_ids": cross["student"]["input_ids"]}
    teachers = {"cross": TokenLM(len(tokenizer_T), seed=0),
                "same": TokenLM(len(tokenizer_S), seed=2)}
    student = TokenLM(len(tokenizer_S), seed=1)
    distiller = purekd.MultiTaskDistiller(
        purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path)),
        purekd.DistillationConfig(kd_loss_type="uld", temperature=TEMPERATURE),
        teachers, student, dict.fromkeys(teachers, adaptor), dict.fromkeys(teachers, adaptor),
        compile=False)
    for task, batch in (("cross", cross), ("same", same)):
        out = distiller.step(batch, task)
        want = (by_hand("uld", student, teachers["cross"], batch, None, {}) if task == "cross"
                else purekd.losses.uld(student.body(same["input_ids"]),
                                       teachers["same"].body(same["input_ids"]),
                                       temperature=TEMPERATURE))
        torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=0)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.5),
                        {"cross": [cross] * 2, "same": [same] * 2}, num_steps=3)
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_multi_task_gold_without_a_vocabulary_map_is_refused(tmp_path, pair):
    tokenizer_S, tokenizer_T, vmap = pair
    teacher, student = TokenLM(len(tokenizer_T), seed=0), TokenLM(len(tokenizer_S), seed=1)
    args = (purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path)),)
    with pytest.raises(ValueError, match=r"^kd_loss_type='gold' needs the vocabulary map of the "
                                         r"two tokenizers"):
        purekd.MultiTaskDistiller(*args, purekd.DistillationConfig(kd_loss_type="gold"),
                                  {"a": teacher}, student, {"a": adaptor}, {"a": adaptor},
                                  compile=False)
    with pytest.raises(ValueError, match=r"vocabulary_map=\.\.\.\) with kd_loss_type="
                                         r"'forward_kl': the vocabulary map is for "
                                         r"kd_loss_type='gold'"):
        purekd.MultiTaskDistiller(*args, purekd.DistillationConfig(kd_loss_type="forward_kl"),
                                  {"a": teacher}, student, {"a": adaptor}, {"a": adaptor},
                                  compile=False, vocabulary_map=vmap)


# ----------------------------------------------------------------------- on-policy
@pytest.mark.parametrize("distiller_class", [purekd.BasicDistiller, purekd.GeneralDistiller])
def test_on_policy_across_tokenizers_through_a_distiller_is_sgd_on_the_step_loss(
        tmp_path, distiller_class):
    tokenizers = (wordpiece_any(), characters())
    vmap = vocabulary_map(tokenizers[1], tokenizers[0])
    # the same rollout by hand: a fresh step with the same seed draws the same samples
    teacher, student = _models(tokenizers)
    step = purekd.make_step(_config("gold"), teacher, student, hf_adaptor(causal=True),
                            hf_adaptor(causal=True), compile=False, tokenizers=tokenizers,
                            vocabulary_map=vmap)
    expected = _sgd(student, step(_prompts(tokenizers[1])).loss, lr=0.3)
    teacher, student = _models(tokenizers)
    distiller = distiller_class(
        purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path)), _config("gold"), teacher,
        student, hf_adaptor(causal=True), hf_adaptor(causal=True), compile=False,
        vocabulary_map=vmap, tokenizers=tokenizers)
    stage = distiller.step.outputs
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.3),
                        [_prompts(tokenizers[1])], num_steps=1)
    assert stage.last_cross_rollout is not None
    # rtol 1e-6, not 1e-10: the runner back-propagates loss * tokens and divides the gradients
    # by the tokens afterwards (token normalisation), and the Hugging Face Llama's RMSNorm
    # computes in float32 even in a float64 model, so the two orders round differently (2e-7
    # relative in the gradients, measured with one tokenizer too; the losses are equal)
    for key, value in expected.items():
        torch.testing.assert_close(dict(student.named_parameters())[key].detach(), value,
                                   rtol=1e-6, atol=1e-9)
    start = dict(_models(tokenizers)[1].named_parameters())
    assert max((expected[k] - start[k]).abs().max().item() for k in expected) > 1e-6


def test_mixed_on_and_off_policy_batches_across_tokenizers_train(tmp_path):
    tokenizers = (wordpiece_any(), characters())
    teacher, student = _models(tokenizers)
    texts = ["let there be light.", "in the beginning god created", "and the earth."]
    batch = {**CrossTokenizerCollator(tokenizers[1], tokenizers[0])(texts),
             **_prompts(tokenizers[1])}
    distiller = purekd.GeneralDistiller(
        purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path)),
        _config("uld", lmbda=0.5, seed=0), teacher, student, hf_adaptor(causal=True),
        hf_adaptor(causal=True), compile=False, tokenizers=tokenizers)
    stage = distiller.step.outputs
    draws = [stage.draw()[0] for _ in range(4)]
    stage.generator.manual_seed(0)
    assert True in draws and False in draws  # both kinds among the four batches
    before = [p.detach().clone() for p in student.parameters()]
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.3), [batch] * 4,
                        num_steps=4)
    assert stage.last_cross_rollout is not None
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
