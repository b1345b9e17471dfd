"""Token-correct normalisation: with gradient accumulation over micro-batches of different
token counts (and under DDP, over processes), a token-level loss's gradient equals that of one
batch holding every token — not the mean of per-micro-batch means (the Hugging Face 2024
gradient-accumulation bug). TextBrewer's per-batch mean stays the default for its loss types."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import purekd
from purekd.combinators import StepOutput, token_normalised, token_share

from .._torchrun import torchrun

IN, VOCAB, LENGTH = 3, 5, 6
KEPT = [6, 1, 4, 2, 5, 3, 6, 2]  # kept tokens per sample: micro-batches of unequal counts


class TokenLM(nn.Module):
    """(B, L, IN) -> (B, L, VOCAB) token logits, float64."""

    def __init__(self, width: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(IN, width), nn.Tanh(), nn.Linear(width, VOCAB))
        self.double()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        del mask
        return {"logits": self.body(x)}


def adaptor(batch: Any, outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {"logits": outputs["logits"], "logits_mask": batch[1]}


def samples() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    data = []
    for kept in KEPT:
        mask = torch.zeros(LENGTH, dtype=torch.long)
        mask[:kept] = 1
        data.append((torch.randn(LENGTH, IN, generator=gen, dtype=torch.float64), mask))
    return data


def batches(items: list[tuple[torch.Tensor, torch.Tensor]], size: int) -> list[tuple[Any, ...]]:
    return [(torch.stack([x for x, _ in items[i:i + size]]),
             torch.stack([m for _, m in items[i:i + size]])) for i in range(0, len(items), size)]


def forward_kl_all_tokens(student: nn.Module, teacher: nn.Module, x: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """The reference: forward KL averaged over every kept token of the batch, by hand."""
    with torch.no_grad():
        p_T = torch.softmax(teacher.body(x), -1)
    log_p_S = torch.log_softmax(student.body(x), -1)
    rows = (p_T * (p_T.log() - log_p_S)).sum(-1)
    keep = mask.bool()
    return rows[keep].mean()


def sgd_step_on_one_batch(lr: float) -> dict[str, torch.Tensor]:
    teacher, student = TokenLM(7, seed=0), TokenLM(4, seed=1)
    x, mask = batches(samples(), len(KEPT))[0]
    loss = forward_kl_all_tokens(student, teacher, x, mask)
    loss.backward()
    with torch.no_grad():
        return {k: p - lr * p.grad for k, p in student.named_parameters()}  # type: ignore[operator]


def distil(tmp_path: Path, normalisation: str, accumulation: int,
           lr: float) -> dict[str, torch.Tensor]:
    teacher, student = TokenLM(7, seed=0), TokenLM(4, seed=1)
    config = purekd.DistillationConfig(kd_loss_type="forward_kl", temperature=1,
                                       loss_normalisation=normalisation)
    train = purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path),
                                  gradient_accumulation_steps=accumulation)
    distiller = purekd.GeneralDistiller(train, config, teacher, student, adaptor, adaptor,
                                        compile=False)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=lr),
                        batches(samples(), len(KEPT) // accumulation), num_steps=1)
    return {k: p.detach() for k, p in student.named_parameters()}


def test_accumulation_of_unequal_micro_batches_equals_one_batch_of_all_tokens(tmp_path):
    expected = sgd_step_on_one_batch(lr=0.7)
    got = distil(tmp_path / "tokens", "auto", accumulation=4, lr=0.7)  # auto: forward_kl
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-13)
    # TextBrewer's mean of per-micro-batch means is a different (the buggy) gradient here
    means = distil(tmp_path / "batch", "batch", accumulation=4, lr=0.7)
    assert max((means[k] - expected[k]).abs().max().item() for k in expected) > 1e-4


def test_textbrewer_loss_types_keep_the_per_batch_mean():
    assert not purekd.DistillationConfig(kd_loss_type="ce").normalises_by_tokens
    assert purekd.DistillationConfig(kd_loss_type="ce",
                                     loss_normalisation="tokens").normalises_by_tokens
    step = purekd.make_step({"kd_loss_type": "ce"}, TokenLM(7, 0), TokenLM(4, 1), adaptor,
                            adaptor, compile=False)
    assert step(batches(samples(), 2)[0]).tokens is None


def test_token_normalised_equals_one_batch_in_value_and_gradient():
    """The pure function: sum_m loss_m * n_m / sum_m n_m over step outputs."""
    teacher, student = TokenLM(7, seed=0), TokenLM(4, seed=1)
    config = {"kd_loss_type": "forward_kl", "temperature": 1}
    step = purekd.make_step(config, teacher, student, adaptor, adaptor, compile=False)
    outputs = [step(b) for b in batches(samples(), 2)]
    assert [o.tokens.item() for o in outputs] == [7.0, 6.0, 8.0, 8.0]  # type: ignore[union-attr]
    x, mask = batches(samples(), len(KEPT))[0]
    whole = forward_kl_all_tokens(student, teacher, x, mask)
    got = token_normalised(outputs)
    torch.testing.assert_close(got, whole, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(got, list(student.parameters()))
    want = torch.autograd.grad(whole, list(student.parameters()))
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    share = token_share(outputs[0].loss, outputs[0].tokens, torch.tensor(29.0))  # type: ignore[arg-type]
    torch.testing.assert_close(share, outputs[0].loss * 7 / 29)
    with pytest.raises(ValueError, match="tokens=None"):
        token_normalised([StepOutput(whole, {})])


DDP_SCRIPT = textwrap.dedent('''
    import os, sys
    import torch
    from tests.runner.test_token_normalisation import TokenLM, adaptor, batches, samples, KEPT
    import purekd

    out, result = sys.argv[1:3]
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    teacher, student = TokenLM(7, seed=0), TokenLM(4, seed=1)
    config = purekd.DistillationConfig(kd_loss_type="forward_kl", temperature=1)
    train = purekd.TrainingConfig(device="cpu", output_dir=out, gradient_accumulation_steps=2)
    distiller = purekd.GeneralDistiller(train, config, teacher, student, adaptor, adaptor,
                                        compile=False)
    half = len(KEPT) // world  # rank 0: samples with 6+1+4+2 kept tokens, rank 1: 5+3+6+2
    mine = samples()[rank * half:(rank + 1) * half]
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.7), batches(mine, 2),
                        num_steps=1)
    torch.save({k: p.detach() for k, p in student.named_parameters()}, f"{result}.rank{rank}")
''')


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is unavailable")
def test_two_processes_normalise_by_the_global_token_count(tmp_path):
    """Two gloo processes x accumulation 2, each micro-batch a different token count: the
    weights after one step equal one batch holding all 8 samples' tokens."""
    script = tmp_path / "ddp_tokens.py"
    script.write_text(DDP_SCRIPT)
    result = tmp_path / "result"
    torchrun(script, str(tmp_path / "out"), str(result))
    expected = sgd_step_on_one_batch(lr=0.7)
    for rank in (0, 1):
        got = torch.load(f"{result}.rank{rank}", weights_only=True)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-13)
