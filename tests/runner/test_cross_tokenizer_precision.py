"""Cross-tokenizer losses in bfloat16: bf16 logits, bf16 parameters, ``torch.autocast`` and the
runner's ``bf16=True``. Nothing runs silently in the wrong dtype:

* the four span losses (``aligned_uld``, ``aligned_gold``, their top-k forms) on bf16 logits
  compute in float32: the loss is float32 and *bitwise* the float32 loss of the same values
  upcast, and the student's gradient is bf16 (the logits' dtype) and bitwise that float32
  gradient rounded to bf16;
* autocast does not reach inside them: under ``torch.autocast("cpu", torch.bfloat16)`` the loss
  of the same logits is bitwise the one computed outside, and so is the gradient (the blockwise
  backward recomputes its blocks outside the forward's autocast region);
* against float32 end to end (the logits themselves rounded to bf16, or a model run under
  autocast, or bf16 parameters) the loss, the gradients and the trained weights agree within the
  tolerances stated below, measured here (ULD's gradient, a sum of signs, is compared by its
  direction);
* with ``TrainingConfig(bf16=True)`` the student's parameters and gradients stay float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import purekd
from purekd import losses
from purekd.integrations import hf_adaptor
from purekd.stages import CrossTokenizerCollator, vocabulary_map

from ._cross_tokenizer_worker import CausalLM

pytest.importorskip("transformers")

TEXTS = ["in the beginning god created the heaven and the earth.", "let there be light.",
         "and the earth.", "the heaven and the new york cafe."]
LOSS_RTOL = 1e-3   # a loss from bf16 logits, a bf16 model or autocast against float32: measured
                   # at most 2.4e-4 relative
GOLD_GRAD_RTOL = 1e-2  # GOLD's whole student gradient, |g - g_32| / |g_32|: measured 2.7e-3
ULD_GRAD_COSINE = 0.9  # ULD's gradient is a sum of signs of sorted differences, and bf16's
                       # rounding flips the signs of the near-equal ones: its norm error is large
                       # (measured 9% under autocast, 30% with bf16 parameters) while its
                       # direction holds (cosine measured 0.956 and 0.996)
GOLD_WEIGHT_ATOL = 1e-3  # one SGD step (lr 0.5, two micro-batches) under the runner's bf16
                         # against float32: measured 1.9e-4 (the weights move by up to 0.076)


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    from ..stages import _tokenizers
    from ..stages.test_cross_batches import characters
    from ..teacher_cache.test_cross_tokenizer import write

    tokenizer_S, tokenizer_T = _tokenizers.wordpiece(), characters()
    batch = CrossTokenizerCollator(tokenizer_S, tokenizer_T)(TEXTS)
    return {"pair": (tokenizer_S, tokenizer_T), "batch": batch,
            "vmap": vocabulary_map(tokenizer_S, tokenizer_T), "write": write}


def _logits(setup: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer_S, tokenizer_T = setup["pair"]
    batch = setup["batch"]
    generator = torch.Generator().manual_seed(0)
    logits_S = 3 * torch.randn(*batch["student"]["input_ids"].shape, len(tokenizer_S),
                               generator=generator)
    logits_T = 3 * torch.randn(*batch["teacher"]["input_ids"].shape, len(tokenizer_T),
                               generator=generator)
    return logits_S, logits_T


def _topk(logits_T: torch.Tensor, batch: dict[str, Any], k: int) -> losses.TopkSpanTeacher:
    logp = torch.log_softmax(logits_T.float(), -1)
    top = logp.topk(k, -1)
    ids = batch["teacher"]["input_ids"]
    following = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    next_logprobs = torch.cat([following, torch.zeros(ids.size(0), 1)], 1)
    return losses.TopkSpanTeacher(top.indices, top.values, next_logprobs, logits_T.size(-1))


LOSSES = ["aligned_uld", "aligned_gold", "aligned_uld_topk", "aligned_gold_topk"]


def _loss(name: str, logits_S: torch.Tensor, logits_T: torch.Tensor, setup: dict[str, Any]
          ) -> torch.Tensor:
    spans, vmap = setup["batch"]["spans"], setup["vmap"]
    if name == "aligned_uld":
        return losses.aligned_uld(logits_S, logits_T, spans, temperature=1.0)
    if name == "aligned_gold":
        return losses.aligned_gold(logits_S, logits_T, spans, vmap, beta=0.9)
    teacher = _topk(logits_T, setup["batch"], k=5)
    if name == "aligned_uld_topk":
        return losses.aligned_uld_topk(logits_S, teacher, spans)
    return losses.aligned_gold_topk(logits_S, teacher, spans, vmap)


def _value_and_grad(name: str, logits_S: torch.Tensor, logits_T: torch.Tensor,
                    setup: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    logits_S = logits_S.detach().requires_grad_(True)
    value = _loss(name, logits_S, logits_T, setup)
    (grad,) = torch.autograd.grad(value, logits_S)
    return value.detach(), grad


@pytest.mark.parametrize("name", LOSSES)
def test_bf16_logits_compute_in_float32(setup, name):
    logits_S, logits_T = _logits(setup)
    half_S, half_T = logits_S.bfloat16(), logits_T.bfloat16()
    value, grad = _value_and_grad(name, half_S, half_T, setup)
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    # the same values upcast to float32: bitwise the same loss, the gradient rounded to bf16
    value_32, grad_32 = _value_and_grad(name, half_S.float(), half_T.float(), setup)
    assert torch.equal(value, value_32)
    assert torch.equal(grad, grad_32.bfloat16())
    # against the unrounded float32 logits: within LOSS_RTOL
    exact, _ = _value_and_grad(name, logits_S, logits_T, setup)
    assert exact.item() > 0.1
    torch.testing.assert_close(value, exact, rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("name", LOSSES)
def test_autocast_does_not_reach_inside_the_span_losses(setup, name):
    logits_S, logits_T = _logits(setup)
    half_S, half_T = logits_S.bfloat16(), logits_T.bfloat16()
    outside = _value_and_grad(name, half_S, half_T, setup)
    leaf = half_S.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = _loss(name, leaf, half_T, setup)
    assert value.dtype == torch.float32
    (grad,) = torch.autograd.grad(value, leaf)
    assert torch.equal(value, outside[0]) and torch.equal(grad, outside[1])
    # float32 logits under autocast: still float32 inside (no op of the loss is autocast)
    value_32, grad_32 = _value_and_grad(name, logits_S, logits_T, setup)
    leaf = logits_S.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = _loss(name, leaf, logits_T, setup)
    (grad,) = torch.autograd.grad(value, leaf)
    assert value.dtype == grad.dtype == torch.float32
    assert torch.equal(value, value_32) and torch.equal(grad, grad_32)


def _models(setup: dict[str, Any], dtype: torch.dtype) -> tuple[CausalLM, CausalLM]:
    tokenizer_S, tokenizer_T = setup["pair"]
    return (CausalLM(len(tokenizer_T), seed=0, dtype=dtype),
            CausalLM(len(tokenizer_S), seed=1, dtype=dtype))


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_a_step_with_bf16_parameters_or_under_autocast_is_near_float32(setup, loss):
    options = {"vocabulary_map": setup["vmap"]} if loss == "gold" else {}
    config = {"kd_loss_type": loss, "temperature": 1.0}
    adaptor = hf_adaptor(causal=True)
    results = {}
    for mode in ("fp32", "autocast", "bf16_params"):
        teacher, student = _models(setup, torch.bfloat16 if mode == "bf16_params"
                                   else torch.float32)
        step = purekd.make_step(config, teacher, student, adaptor, adaptor, compile=False,
                                **options)
        if mode == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = step(setup["batch"])
        else:
            out = step(setup["batch"])
        out.loss.backward()
        assert out.loss.dtype == torch.float32, mode
        grads = [p.grad for p in student.parameters()]
        want = torch.bfloat16 if mode == "bf16_params" else torch.float32
        assert all(g is not None and g.dtype == want for g in grads), mode
        results[mode] = (out.loss.detach(), [g.float() for g in grads])
    loss_32, grads_32 = results["fp32"]
    for mode in ("autocast", "bf16_params"):
        torch.testing.assert_close(results[mode][0], loss_32, rtol=LOSS_RTOL, atol=0)
        got, want = (torch.cat([g.flatten() for g in gs]) for gs in (results[mode][1], grads_32))
        _assert_near(loss, got, want, mode)


def _assert_near(loss: str, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if loss == "gold":
        relative = ((got - want).norm() / want.norm()).item()
        assert relative <= GOLD_GRAD_RTOL, (what, relative)
    else:
        cosine = torch.nn.functional.cosine_similarity(got, want, 0).item()
        assert cosine >= ULD_GRAD_COSINE, (what, cosine)


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_the_runners_bf16_trains_near_float32_and_keeps_float32_weights(setup, tmp_path: Path,
                                                                        loss):
    options = {"vocabulary_map": setup["vmap"]} if loss == "gold" else {}
    adaptor = hf_adaptor(causal=True)
    batches = [CrossTokenizerCollator(*setup["pair"])(TEXTS[i:i + 2]) for i in (0, 2)]
    final = {}
    for bf16 in (False, True):
        teacher, student = _models(setup, torch.float32)
        distiller = purekd.GeneralDistiller(
            purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path / str(bf16)), bf16=bf16,
                                  gradient_accumulation_steps=2),
            purekd.DistillationConfig(kd_loss_type=loss, temperature=1.0), teacher, student,
            adaptor, adaptor, compile=False, **options)
        with distiller:
            distiller.train(torch.optim.SGD(student.parameters(), lr=0.5), batches,
                            num_steps=1)
        assert all(p.dtype == torch.float32 for p in student.parameters())
        final[bf16] = {k: v.clone() for k, v in student.state_dict().items()}
    start = _models(setup, torch.float32)[1].state_dict()
    assert max((final[False][k] - start[k]).abs().max().item() for k in start) > 1e-2
    if loss == "gold":
        for key, value in final[False].items():
            torch.testing.assert_close(final[True][key], value, atol=GOLD_WEIGHT_ATOL, rtol=0)
    else:  # the update's direction (see ULD_GRAD_COSINE)
        moved = [torch.cat([(final[b][k] - start[k]).flatten() for k in start]) for b in (True,
                                                                                        False)]
        _assert_near(loss, moved[0], moved[1], "update")
