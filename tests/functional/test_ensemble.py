"""Same-architecture teachers in one ``vmap``: equal to looping over the teachers."""

from __future__ import annotations

import pytest
import torch

from purekd.combinators import Step, mean_of_teachers, models_stage
from purekd.functional import Ensemble, ensemble_teachers
from purekd.stages import Split, batch_split
from tests._toys import ATOL, ToyEncoder, assert_tree_close, make_step, toy_adaptor, toy_batch


def teachers(n=3, **kwargs):
    torch.manual_seed(0)
    return [ToyEncoder(8, 3, **kwargs) for _ in range(n)]


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_ensemble_equals_each_model(as_dict):
    models = teachers()
    batch = toy_batch(as_dict=as_dict)
    got = Ensemble(models)(batch, scale=0.5)
    for model, output in zip(models, got, strict=True):
        expected = model(**batch, scale=0.5) if as_dict else model(*batch, scale=0.5)
        assert_tree_close(output, {k: (v.detach() if isinstance(v, torch.Tensor) else
                                       [t.detach() for t in v]) for k, v in expected.items()})


@pytest.mark.parametrize("token_level", [False, True])
def test_ensemble_teachers_equals_mean_of_teachers(token_level):
    models = teachers(token_level=token_level, n_logits=2)
    adaptor = toy_adaptor(logits_mask=token_level)
    split = batch_split(toy_batch(token_level=token_level))
    got = ensemble_teachers(models, adaptor)(split, {})
    expected = mean_of_teachers(models, adaptor)(split, {})
    for a, b in zip(got.logits, expected.logits, strict=True):  # on logits
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.hidden[2], expected.hidden[2], atol=ATOL, rtol=0)  # a layer
    assert_tree_close(got, expected)  # and everything else


def test_ensemble_teachers_read_cached_outputs():
    models = teachers(2)
    adaptor = toy_adaptor()
    batch = toy_batch()
    cached = [m(*batch) for m in models]
    got = ensemble_teachers(models, [adaptor, adaptor])(Split(batch, batch, cached), {})
    assert_tree_close(got, mean_of_teachers(models, adaptor)(batch_split(batch), {}))


def test_a_step_with_an_ensemble_equals_the_multi_teacher_step():
    models = teachers()
    torch.manual_seed(1)
    student = ToyEncoder(6)
    adaptor = toy_adaptor()
    config = {"hard_label_weight": 0.5, "probability_shift": True}
    reference = make_step(config, models, student, adaptor, adaptor)
    step = Step(student=student, loss=reference.loss,
                outputs=models_stage(ensemble_teachers(models, adaptor), student, adaptor))
    batch = toy_batch()
    got, expected = step(batch), reference(batch)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    assert_tree_close(got.terms, expected.terms)


def test_ensemble_rejects_mixed_architectures():
    with pytest.raises(ValueError, match="at least one model"):
        Ensemble([])
    with pytest.raises(ValueError, match="one architecture"):
        Ensemble([ToyEncoder(), torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="identical parameter names and shapes"):
        Ensemble([ToyEncoder(8), ToyEncoder(6)])
    with pytest.raises(ValueError, match="3 teachers but 2 adaptors"):
        ensemble_teachers(teachers(), [toy_adaptor()] * 2)
