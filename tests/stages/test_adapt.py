"""adapt / normalise / detach / mean_logits."""

from __future__ import annotations

import pytest
import torch

from purekd.presets import ADAPTOR_KEYS
from purekd.stages import Adapted, AdaptorError, adapt, detach, mean_logits, normalise


def test_adapt_calls_the_adaptor_with_batch_and_outputs():
    seen = []
    logits = torch.randn(2, 3)

    def adaptor(batch, outputs):
        seen.append((batch, outputs))
        return {"logits": outputs[0]}

    batch, outputs = {"x": 1}, (logits,)
    adapted = adapt(adaptor, batch, outputs)
    assert seen == [(batch, outputs)]
    assert isinstance(adapted, Adapted)
    assert adapted.logits == (logits,)


def test_single_tensors_become_one_tuples_and_lists_become_tuples():
    l0, l1 = torch.randn(2, 3), torch.randn(2, 3)
    m, y, loss = torch.ones(2, 4), torch.zeros(2, dtype=torch.long), torch.tensor(1.5)
    h = [torch.randn(2, 4, 5) for _ in range(3)]
    a = torch.randn(2, 2, 4, 4)
    inputs_mask = torch.ones(2, 4)
    adapted = normalise({
        "logits": [l0, l1], "logits_mask": m, "labels": [y, y], "losses": loss,
        "hidden": h, "attention": a, "inputs_mask": inputs_mask,
    })
    assert adapted.logits == (l0, l1)
    assert adapted.logits_mask == (m,)
    assert adapted.labels == (y, y)
    assert adapted.losses == (loss,)
    assert isinstance(adapted.hidden, tuple) and len(adapted.hidden) == 3
    assert all(x is y for x, y in zip(adapted.hidden, h, strict=True))
    assert adapted.attention == (a,)
    assert adapted.inputs_mask is inputs_mask
    assert adapted.captured == ()


def test_missing_keys_are_empty():
    adapted = normalise({"losses": torch.tensor(0.5)})
    assert adapted.logits == () and adapted.logits_mask == () and adapted.labels == ()
    assert adapted.hidden == () and adapted.attention == ()
    assert adapted.inputs_mask is None
    assert normalise({"logits": torch.ones(1, 2), "inputs_mask": None}).inputs_mask is None


def test_a_single_logits_mask_serves_several_logits():
    adapted = normalise({"logits": [torch.ones(1, 2, 3)] * 3, "logits_mask": torch.ones(1, 2)})
    assert len(adapted.logits) == 3 and len(adapted.logits_mask) == 1


@pytest.mark.parametrize("result", [None, (torch.ones(2),), [1, 2], torch.ones(2), "logits"])
def test_non_dict_raises_naming_valid_keys(result):
    with pytest.raises(ValueError) as info:
        normalise(result)
    assert isinstance(info.value, AdaptorError)
    assert type(result).__name__ in str(info.value)
    for key in ADAPTOR_KEYS:
        assert key in str(info.value)


def test_unknown_key_raises_naming_it_and_the_valid_keys():
    with pytest.raises(ValueError, match="'hidden_states'") as info:
        normalise({"logits": torch.ones(1, 2), "hidden_states": [torch.ones(1, 2, 3)]})
    for key in ADAPTOR_KEYS:
        assert repr(key) in str(info.value)


def test_empty_dict_raises():
    with pytest.raises(ValueError, match="empty"):
        normalise({})


@pytest.mark.parametrize(
    "result",
    [
        {"logits": [torch.ones(1, 2)] * 2, "logits_mask": [torch.ones(1)] * 3},
        {"logits": [torch.ones(1, 2)] * 3, "logits_mask": [torch.ones(1)] * 2},
        {"logits": [torch.ones(1, 2)] * 2, "labels": [torch.zeros(1)]},
        {"logits": torch.ones(1, 2), "labels": [torch.zeros(1)] * 2},
    ],
    ids=["masks>logits", "masks<logits", "labels<logits", "labels>logits"],
)
def test_length_mismatch_raises(result):
    with pytest.raises(ValueError, match="logits"):
        normalise(result)


@pytest.mark.parametrize(
    ("result", "key"),
    [
        ({"logits": 3.0}, "logits"),
        ({"hidden": {"a": torch.ones(1)}}, "hidden"),
        ({"logits": torch.ones(1, 2), "inputs_mask": [[1, 1]]}, "inputs_mask"),
    ],
)
def test_wrong_value_types_raise_naming_the_key(result, key):
    with pytest.raises((ValueError, TypeError), match=key):
        normalise(result)


def test_normalise_does_not_modify_the_dict():
    hidden = [torch.ones(1, 2, 3)]
    result = {"hidden": hidden, "logits": torch.ones(1, 2)}
    normalise(result)
    assert result == {"hidden": hidden, "logits": result["logits"]}
    assert isinstance(result["hidden"], list) and len(hidden) == 1


def test_detach():
    w = torch.randn(2, 3, requires_grad=True)
    logits = w * 2
    hidden = w + 1
    mask = torch.ones(2, 3)
    adapted = normalise({"logits": logits, "hidden": [hidden, hidden], "losses": w.sum(),
                         "inputs_mask": mask})._replace(captured=(w * 3, "not a tensor"))
    detached = detach(adapted)
    assert isinstance(detached, Adapted)
    for field in ("logits", "hidden", "losses"):
        before, after = getattr(adapted, field), getattr(detached, field)
        assert len(before) == len(after)
        for b, a in zip(before, after, strict=True):
            assert not a.requires_grad and a.grad_fn is None
            assert torch.equal(a, b)
    assert detached.captured[1] == "not a tensor"
    assert not detached.captured[0].requires_grad
    assert torch.equal(detached.inputs_mask, mask)
    assert detached.logits_mask == () and detached.labels == () and detached.attention == ()
    assert adapted.logits[0].requires_grad  # the original is unchanged
    assert detach(Adapted()).inputs_mask is None


def test_mean_logits_is_exact():
    gen = torch.Generator().manual_seed(0)
    t0 = normalise({"logits": [torch.randn(3, 4, generator=gen), torch.randn(3, 2, 5, generator=gen)],
                    "hidden": torch.ones(1), "labels": [torch.zeros(3), torch.zeros(3, 2)]})
    t1 = normalise({"logits": [torch.randn(3, 4, generator=gen), torch.randn(3, 2, 5, generator=gen)],
                    "hidden": torch.zeros(1)})
    merged = mean_logits([t0, t1])
    for i in range(2):
        assert torch.equal(merged.logits[i], (t0.logits[i] + t1.logits[i]) / 2)
    assert merged.hidden is t0.hidden and merged.labels is t0.labels  # rest from the first
    t2 = normalise({"logits": [torch.randn(3, 4, generator=gen), torch.randn(3, 2, 5, generator=gen)]})
    merged3 = mean_logits([t0, t1, t2])
    for i in range(2):
        # TextBrewer: sum(l_T) / len(l_T), summed in teacher order
        assert torch.equal(merged3.logits[i], sum([t0.logits[i], t1.logits[i], t2.logits[i]]) / 3)
    single = mean_logits([t0])
    assert all(torch.equal(a, b) for a, b in zip(single.logits, t0.logits, strict=True))


def test_mean_logits_errors():
    with pytest.raises(ValueError):
        mean_logits([])
    with pytest.raises(ValueError, match="different numbers of logits"):
        mean_logits([normalise({"logits": torch.ones(1, 2)}),
                     normalise({"logits": [torch.ones(1, 2)] * 2})])
