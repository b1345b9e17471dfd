"""``token_kd(ce_weight=c)``: divergence + c x the student's cross-entropy, in the same pass on the
fused forms; equal to the two losses computed apart, on every form, value and gradient."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from purekd import losses
from purekd.losses import _blockwise
from purekd.stages import normalise
from purekd.terms import make_context, token_kd

CTX = make_context()
B, L, H, V, K = 2, 5, 4, 11, 3


@pytest.fixture(autouse=True)
def _eager_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_blockwise, "COMPILE_BLOCKS", False)


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _case() -> dict[str, Any]:
    hidden = randn(0, B, L, H).requires_grad_(True)
    weight = randn(1, V, H).requires_grad_(True)
    labels = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(2))
    labels[0, -1] = labels[1, -1] = -100  # the last position has no next token
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 1] = 0  # a row the KD leaves out: its label must not count either
    teacher_logits = randn(3, B, L, V)
    logprobs_full = teacher_logits.log_softmax(-1)
    top = logprobs_full.topk(K, dim=-1)
    return {"hidden": hidden, "weight": weight, "labels": labels, "mask": mask,
            "teacher_logits": teacher_logits, "teacher_hidden": randn(4, B, L, H),
            "teacher_weight": randn(5, V, H), "ids": top.indices, "logprobs": top.values}


def _expected_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    kept = torch.where(mask != 0, labels, -100).reshape(-1)
    return F.cross_entropy(logits.reshape(-1, V), kept, ignore_index=-100)


def _grads(value: torch.Tensor, case: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(value, (case["hidden"], case["weight"]), retain_graph=True)


@pytest.mark.parametrize("form", ["fused_topk", "fused_dense", "logits_topk", "logits_dense"])
def test_value_and_gradients_equal_the_divergence_plus_the_weighted_cross_entropy(form: str):
    case = _case()
    logits_S = case["hidden"] @ case["weight"].t()
    student: dict[str, Any] = {"labels": case["labels"], "logits_mask": case["mask"]}
    if form.startswith("fused"):
        student.update(lm_hidden=case["hidden"], lm_weight=case["weight"])
    else:
        student["logits"] = logits_S
    if form.endswith("topk"):
        teacher: dict[str, Any] = {"topk_ids": case["ids"], "topk_logprobs": case["logprobs"]}
        kd = losses.topk_kl(logits_S, case["ids"], case["logprobs"], mask=case["mask"])
    elif form == "fused_dense":
        teacher = {"lm_hidden": case["teacher_hidden"], "lm_weight": case["teacher_weight"]}
        kd = losses.forward_kl(logits_S, case["teacher_hidden"] @ case["teacher_weight"].t(),
                               mask=case["mask"])
    else:
        teacher = {"logits": case["teacher_logits"]}
        kd = losses.forward_kl(logits_S, case["teacher_logits"], mask=case["mask"])
    s, t = normalise(student), normalise(teacher)
    term = token_kd("forward_kl", ce_weight=0.7)
    term.check(s, t)
    got = term(s, t, CTX)["kd_loss"]
    expected = kd + 0.7 * _expected_ce(logits_S, case["labels"], case["mask"])
    torch.testing.assert_close(got, expected)
    for g, e in zip(_grads(got, case), _grads(expected, case), strict=True):
        torch.testing.assert_close(g, e)


def test_without_labels_or_with_a_bad_weight_it_says_what_to_do():
    case = _case()
    s = normalise({"lm_hidden": case["hidden"], "lm_weight": case["weight"]})
    t = normalise({"topk_ids": case["ids"], "topk_logprobs": case["logprobs"]})
    with pytest.raises(ValueError, match=r"needs the student's labels.*labels_key='input_ids'"):
        token_kd(ce_weight=1.0).check(s, t)
    wrong = normalise({"lm_hidden": case["hidden"], "lm_weight": case["weight"],
                       "labels": case["labels"][:, :3]})
    with pytest.raises(ValueError, match=r"labels have shape \(2, 3\) but its rows \(2, 5\)"):
        token_kd(ce_weight=1.0).check(wrong, t)
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="ce_weight"):
            token_kd(ce_weight=bad)
