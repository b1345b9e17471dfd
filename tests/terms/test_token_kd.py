"""``token_kd``: the token-level divergence on logits, fused output layers or a top-k teacher;
masks, pairing, vocabulary checks, no graph break."""

from __future__ import annotations

import pytest
import torch

from purekd import losses
from purekd.stages import normalise
from purekd.terms import make_context, token_kd

CTX = make_context()


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_dense_logits_with_a_flat_mask_equal_the_loss_on_the_kept_rows():
    keep = torch.tensor([1, 0, 1, 1, 0])
    s = normalise({"logits": randn(0, 5, 7), "logits_mask": keep})
    t = normalise({"logits": randn(1, 5, 7)})
    term = token_kd("jsd", temperature=2.0, params={"beta": 0.3})
    term.check(s, t)
    rows = keep.bool()
    expected = losses.jsd(s.logits[0][rows], t.logits[0][rows], beta=0.3, temperature=2.0)
    torch.testing.assert_close(term(s, t, CTX)["kd_loss"], expected)
    assert term.kept_rows is not None and term.kept_rows(s, t).item() == 3


def test_each_side_its_own_mask_pairs_the_kept_rows():
    mask_S, mask_T = torch.tensor([[1, 1, 0, 1]]), torch.tensor([[0, 1, 1, 1]])
    s = normalise({"logits": randn(0, 1, 4, 6), "logits_mask": mask_S})
    t = normalise({"logits": randn(1, 1, 4, 6), "logits_mask": mask_T})
    got = token_kd("reverse_kl")(s, t, CTX)["kd_loss"]
    expected = losses.reverse_kl(s.logits[0][mask_S.bool()], t.logits[0][mask_T.bool()])
    torch.testing.assert_close(got, expected)


def test_a_vocabulary_mismatch_names_both_sizes_and_the_shared_vocabulary_option():
    s = normalise({"logits": randn(0, 2, 3, 10)})
    t = normalise({"logits": randn(1, 2, 3, 12)})
    with pytest.raises(ValueError, match=r"10 entries.*12.*shared_vocab=True"):
        token_kd("forward_kl").check(s, t)
    shared = token_kd("forward_kl", shared_vocab=True)
    shared.check(s, t)
    torch.testing.assert_close(shared(s, t, CTX)["kd_loss"],
                               losses.forward_kl(s.logits[0], t.logits[0][..., :10]))
    fused_S = normalise({"lm_hidden": randn(2, 2, 3, 4), "lm_weight": randn(3, 10, 4)})
    fused_T = normalise({"lm_hidden": randn(4, 2, 3, 5), "lm_weight": randn(5, 12, 5)})
    with pytest.raises(ValueError, match=r"output layers.*10 entries.*12.*shared_vocab"):
        token_kd("tvd").check(fused_S, fused_T)


@pytest.mark.parametrize(("student", "teacher", "kwargs", "match"), [
    ({"lm_hidden": randn(0, 2, 3, 4), "lm_weight": randn(1, 6, 4)},
     {"logits": randn(2, 2, 3, 6)}, {}, "return the same form from both"),
    ({"logits": randn(0, 2, 3, 6)},
     {"topk_ids": torch.zeros(2, 3, 2, dtype=torch.long), "topk_logprobs": randn(1, 2, 3, 2)},
     {"loss": "tvd"}, "no top-k form"),
    ({"logits": randn(0, 2, 3, 6)}, {"logits": randn(1, 2, 3, 6)},
     {"params": {"tail": True}}, "tail is for a top-k teacher"),
    ({"topk_ids": torch.zeros(2, 3, 2, dtype=torch.long), "topk_logprobs": randn(1, 2, 3, 2)},
     {"logits": randn(1, 2, 3, 6)}, {}, "top-k outputs are a teacher's"),
    ({"logits": randn(0, 2, 3, 6)}, {"logits": randn(1, 2, 4, 6)}, {}, "the same rows"),
    ({"logits": randn(0, 2, 3, 6), "logits_mask": torch.ones(2, 4)}, {"logits": randn(1, 2, 3, 6)},
     {}, r"must be \(2, 3\)"),
])
def test_bad_outputs_raise_before_the_loss_path(student, teacher, kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_kd(**kwargs).check(normalise(student), normalise(teacher))


def test_unknown_loss_or_parameter():
    with pytest.raises(ValueError, match="unknown loss 'ce'"):
        token_kd("ce")
    with pytest.raises(ValueError, match="no parameter"):
        token_kd("tvd", params={"beta": 0.5})


def test_no_graph_break():
    s = normalise({"logits": randn(0, 2, 3, 7), "logits_mask": torch.tensor([[1, 0, 1], [1, 1, 0]])})
    t = normalise({"logits": randn(1, 2, 3, 7)})
    term = token_kd("jsd", temperature=1.5)
    explanation = torch._dynamo.explain(term.fn)(s, t, CTX)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_masks_keeping_different_numbers_of_rows_are_refused():
    s = normalise({"logits": randn(0, 1, 4, 6), "logits_mask": torch.tensor([[1, 1, 0, 1]])})
    t = normalise({"logits": randn(1, 1, 4, 6), "logits_mask": torch.tensor([[0, 1, 0, 1]])})
    with pytest.raises(ValueError, match=r"logits\[0\]: the student's logits_mask keeps 3 rows "
                                         r"but the teacher's keeps 2; the kept rows are paired"):
        token_kd("forward_kl").check(s, t)


@pytest.mark.parametrize("kind", ["token_kd", "logits_kd"])
def test_a_first_batch_that_keeps_no_token_says_so(kind):
    """Issue 18: every label -100 used to be reported only as 'no gradient ... detached'."""
    from purekd.terms import logits_kd

    s = normalise({"logits": randn(0, 2, 3, 7), "logits_mask": torch.zeros(2, 3, dtype=torch.long)})
    t = normalise({"logits": randn(1, 2, 3, 7)})
    term = token_kd("forward_kl") if kind == "token_kd" else logits_kd()
    with pytest.warns(UserWarning, match="no tokens kept in the first batch.*every label -100"):
        term.check(s, t)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        term.check(s, t)  # once: later batches are not synchronised for it
    assert term(s, t, CTX)["kd_loss"].item() == 0.0


def test_a_run_whose_batches_keep_no_token_says_no_tokens_kept(tmp_path):
    """Issue 18: every label -100 — the run warns on the first batch and stops at the first
    optimizer step with an error that says 'no tokens kept' (it blamed detached outputs only)."""
    import purekd
    from tests.runner.test_token_normalisation import TokenLM, adaptor

    teacher, student = TokenLM(7, 0), TokenLM(4, 1)
    x, mask = torch.randn(2, 6, 3, dtype=torch.float64), torch.zeros(2, 6, dtype=torch.long)
    config = purekd.DistillationConfig(kd_loss_type="forward_kl", temperature=1)
    train = purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path))
    distiller = purekd.GeneralDistiller(train, config, teacher, student, adaptor, adaptor,
                                        compile=False)
    with distiller, pytest.warns(UserWarning, match="no tokens kept in the first batch"), \
            pytest.raises(ValueError, match="no tokens kept"):
        distiller.train(torch.optim.SGD(student.parameters(), lr=1.0), [(x, mask)], num_steps=1)


def test_a_mask_that_does_not_fit_flat_token_logits_is_an_error():
    s = normalise({"logits": randn(0, 6, 7), "logits_mask": torch.ones(2, 3)})
    t = normalise({"logits": randn(1, 6, 7)})
    with pytest.raises(ValueError, match=r"logits_mask has shape \(2, 3\).*must be \(6,\)"):
        token_kd("forward_kl").check(s, t)
