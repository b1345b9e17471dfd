"""forward: the call conventions dict -> model(**batch), tuple/list -> model(*batch)."""

from __future__ import annotations

import pytest
import torch

from purekd.stages import forward


def recorder(*args, **kwargs):
    return args, kwargs


def test_dict_batch_is_passed_as_keywords():
    x = torch.ones(2)
    assert forward(recorder, {"input_ids": x, "mask": 3}) == ((), {"input_ids": x, "mask": 3})
    assert forward(recorder, {"input_ids": x}, flag=True) == ((), {"input_ids": x, "flag": True})


@pytest.mark.parametrize("container", [tuple, list])
def test_sequence_batch_is_passed_positionally(container):
    x, y = torch.ones(2), torch.zeros(2)
    args, kwargs = forward(recorder, container([x, y]))
    assert args == (x, y) and kwargs == {}
    args, kwargs = forward(recorder, container([x]), output_hidden_states=True)
    assert args == (x,) and kwargs == {"output_hidden_states": True}


def test_calls_a_module():
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    torch.testing.assert_close(forward(model, (x,)), model(x))
    torch.testing.assert_close(forward(model, {"input": x}), model(x))


def test_duplicate_keyword_is_an_error():
    with pytest.raises(TypeError):
        forward(recorder, {"flag": 1}, flag=2)


@pytest.mark.parametrize("batch", [torch.ones(2, 3), 3, "text"])
def test_other_batches_raise_type_error(batch):
    with pytest.raises(TypeError, match=type(batch).__name__) as info:
        forward(recorder, batch)
    assert "(tensor,)" in str(info.value)


def test_batch_not_modified():
    batch = {"a": torch.ones(2)}
    forward(lambda **kw: kw.pop("a"), batch)
    assert list(batch) == ["a"]
