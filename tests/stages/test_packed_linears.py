"""``packed_linears``: oneDNN-packed ``nn.Linear`` products for a block of code — the same
products as ``F.linear`` (2-D and 3-D inputs, with and without bias), what is packed and what
is left alone, tied weights packed once, gradients, and the model restored after the block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from purekd.stages import _packed_linears
from purekd.stages._packed_linears import available_memory, onednn_packing, packed_linears

pytestmark = pytest.mark.skipif(not onednn_packing(), reason="no oneDNN packed linear")


class Scaled(nn.Linear):
    """A subclass with a forward of its own (as LoRA or quantised layers): never packed."""

    def forward(self, x):
        return 2 * super().forward(x)


def model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 48, bias=False),
                        Scaled(48, 48), nn.Linear(48, 300))
    net.append(nn.Linear(48, 300).double())  # float64: not packed
    return net


@pytest.mark.parametrize("shape", [(5, 48), (3, 1, 48), (2, 7, 48)])
def test_the_products_are_the_modules(shape):
    net = model()
    x = torch.randn(*shape)

    def every_layer():  # each layer on an input of its width and dtype
        hidden = net[0](x)
        return [hidden, net[2](hidden), net[3](x), net[4](x), net[5](x.double())]

    with torch.no_grad():
        reference = every_layer()
        with packed_linears(net, shape[0]) as count:
            ours = every_layer()
    assert count == 3  # net[0], net[2] (no bias), net[4]
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_what_is_packed_and_what_is_left():
    net = model()
    with torch.no_grad(), packed_linears(net, 4):
        packed = [("forward" in m.__dict__) for m in net]
    assert packed == [True, False, True, False, True, False]
    assert not any("forward" in m.__dict__ for m in net)


def test_a_weight_that_is_a_strided_view_is_left_alone():
    layer = nn.Linear(16, 8)
    layer.weight = nn.Parameter(torch.randn(16, 8).t())  # (8, 16), not contiguous
    x = torch.randn(3, 16)
    with torch.no_grad(), packed_linears(layer, 3) as count:
        assert count == 0
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight,
                                                                        layer.bias))


def test_a_forward_someone_else_replaced_is_kept():
    net = model()
    own = net[0].forward
    net[0].forward = lambda x: own(x) + 1  # as accelerate's hooks do
    replaced = net[0].forward
    with torch.no_grad(), packed_linears(net, 4) as count:
        assert net[0].forward is replaced
    assert count == 2 and net[0].forward is replaced


def test_a_tied_weight_is_packed_once():
    a, b = nn.Linear(16, 32), nn.Linear(16, 32)
    b.weight = a.weight
    with torch.no_grad(), packed_linears(nn.Sequential(a, b), 2) as count:
        assert count == 2
        assert a.forward.args[1] is b.forward.args[1]  # the same packed copy


def test_gradients_take_the_modules_own_product():
    net = model()
    x = torch.randn(4, 48, requires_grad=True)
    with packed_linears(net, 4):
        net[0](x).sum().backward()
    expected = torch.ones(4, 96) @ net[0].weight
    torch.testing.assert_close(x.grad, expected)


def test_the_model_is_restored_after_an_exception():
    net = model()
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), packed_linears(net, 4):
        assert "forward" in net[0].__dict__
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in net)


def test_the_copies_stay_within_half_the_available_memory(monkeypatch):
    net = model()  # float32 weights packed in order: 48x96, 96x48, 48x300 floats
    sizes = [net[i].weight.numel() * 4 for i in (0, 2, 4)]
    monkeypatch.setattr(_packed_linears, "available_memory", lambda: 2 * (sizes[0] + sizes[1]))
    x = torch.randn(2, 48)
    with torch.no_grad(), packed_linears(net, 2) as count:
        assert count == 2 and "forward" not in net[4].__dict__  # the head did not fit
        torch.testing.assert_close(net[4](x), torch.nn.functional.linear(x, net[4].weight,
                                                                         net[4].bias))
    monkeypatch.setattr(_packed_linears, "available_memory", lambda: None)  # not reported
    with torch.no_grad(), packed_linears(net, 2) as count:
        assert count == 3


def test_available_memory_reads_the_system():
    value = available_memory()
    assert value is None or value > 0


def test_under_cpu_autocast_the_modules_own_lower_precision_product_is_kept():
    net = model()
    x = torch.randn(4, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = net[0](x)
        with packed_linears(net, 4) as count:  # entered under autocast: nothing packed
            assert count == 0
            assert torch.equal(net[0](x), expected)
    with torch.no_grad(), packed_linears(net, 4) as count:  # autocast entered inside the block
        assert count == 3
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = net[0](x)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, expected)
