"""Distillers with the token-level losses: what cannot be cached says so."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import purekd


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.out = nn.Linear(3, 4), nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = torch.tanh(self.body(x))
        return {"hidden": hidden, "logits": self.out(hidden)}


def test_caching_a_fused_teacher_raises_before_training(tmp_path):
    teacher, student = Head(), Head()

    def fused(model):
        return lambda batch, out: {"lm_hidden": out["hidden"], "lm_weight": model.out.weight,
                                   "lm_bias": model.out.bias}

    config = purekd.DistillationConfig(kd_loss_type="forward_kl", is_caching_logits=True)
    train = purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path))
    distiller = purekd.BasicDistiller(train, config, teacher, student, fused(teacher),
                                      fused(student), compile=False)
    before = [p.clone() for p in student.parameters()]
    with distiller, pytest.raises(ValueError, match=r"is_caching_logits=True.*top-k teacher cache"):
        distiller.train(torch.optim.SGD(student.parameters(), lr=1.0),
                        [(torch.randn(2, 5, 3),)], num_epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
