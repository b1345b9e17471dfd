"""kd_loss_type="uld": the sorted-probability L1 registered as a divergence (row t against row t),
in the dense and fused forms and the config; gold's matched part through the registry."""

from __future__ import annotations

import pytest
import torch

from purekd import DistillationConfig, losses
from purekd.losses import VocabularyMap

from .test_uld import make_spans, merged_reference, sorted_l1_reference


def test_registered_uld_dense_matches_the_reference():
    generator = torch.Generator().manual_seed(0)
    logits_S = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64)
    logits_T = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    value = losses.divergence("uld")(logits_S, logits_T, mask=mask)
    rows = [(b, t) for b in range(2) for t in range(3) if mask[b, t]]
    expected = torch.stack([sorted_l1_reference(logits_S[b, t].softmax(-1),
                                                logits_T[b, t].softmax(-1))
                            for b, t in rows]).mean()
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    assert "uld" in losses.divergence_table()
    # the registered loss is losses.uld itself, with its options
    assert losses.divergence("uld") is losses.uld
    torch.testing.assert_close(losses.uld(logits_S, logits_T, mask=mask), value)
    torch.testing.assert_close(losses.uld(logits_S, logits_T, top_k=3),
                               losses.divergence("uld", top_k=3)(logits_S, logits_T))


def test_registered_uld_fused_equals_dense():
    generator = torch.Generator().manual_seed(1)
    hidden_S = torch.randn(6, 4, generator=generator, requires_grad=True)
    weight_S = torch.randn(9, 4, generator=generator, requires_grad=True)
    hidden_T, weight_T = torch.randn(6, 5, generator=generator), torch.randn(9, 5,
                                                                            generator=generator)
    fused = losses.fused_linear_kd(hidden_S, weight_S, hidden_T, weight_T, loss="uld")
    grads = torch.autograd.grad(fused, (hidden_S, weight_S))
    dense = losses.divergence("uld")(hidden_S @ weight_S.T, hidden_T @ weight_T.T)
    expected = torch.autograd.grad(dense, (hidden_S, weight_S))
    torch.testing.assert_close(fused, dense, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_config_names_and_validates_uld():
    assert DistillationConfig(kd_loss_type="uld").kd_loss_type == "uld"
    assert DistillationConfig(kd_loss_type=["uld", {"top_k": 64}]).kd_loss_type == (
        "uld", {"top_k": 64})
    with pytest.raises(ValueError, match=r"top_k=0 must be a positive int, or None to sort the "
                                         r"whole vocabulary"):
        DistillationConfig(kd_loss_type=["uld", {"top_k": 0}])


def test_gold_takes_a_registered_divergence():
    def half_l2(log_p_S, log_p_T, scale=1.0):
        """\\(\\tfrac{s}{2}\\sum_v (p^S_v - p^T_v)^2\\)"""
        return scale * 0.5 * (log_p_S.exp() - log_p_T.exp()).pow(2).sum(-1)

    losses.register_divergence("half_l2_xtok", half_l2, defaults={"scale": 1.0})
    try:
        generator = torch.Generator().manual_seed(2)
        logits_S = torch.randn(4, 6, generator=generator, dtype=torch.float64)
        logits_T = torch.randn(4, 8, generator=generator, dtype=torch.float64)
        pairs = [(([0, 1], [2, 3]), ([0], [1])), (([2], [5]), ([1, 2, 3], [0, 7, 4]))]
        vocabulary_map = VocabularyMap(torch.tensor([0, 4]), torch.tensor([6, 1]))
        student = logits_S.clone().requires_grad_()
        value = losses.aligned_gold(student, logits_T, make_spans(pairs), vocabulary_map,
                            loss="half_l2_xtok", scale=3.0, matched_weight=1.0,
                            unmatched_weight=0.0)
        (grad,) = torch.autograd.grad(value, student)
        reference_input = logits_S.clone().requires_grad_()
        expected = torch.stack([
            half_l2(merged_reference(reference_input, *s).log()[[0, 4]],
                    merged_reference(logits_T, *t).log()[[6, 1]], scale=3.0)
            for s, t in pairs]).mean()
        (expected_grad,) = torch.autograd.grad(expected, reference_input)
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    finally:
        losses.unregister_divergence("half_l2_xtok")
