"""``compile=False`` reaches the losses' block kernels: a loss path wrapped by ``compiled(...,
enabled=False)`` (what ``make_step(compile=False)`` builds) runs the fused and chunked losses'
blocks eagerly, forward and backward; the setting holds only for that call (no global switch
is changed, nothing leaks into a later call)."""

from __future__ import annotations

import pytest
import torch

from purekd import _compiling
from purekd.losses import _blockwise, divergence, fused_linear_kd


@pytest.fixture
def kernels(monkeypatch):
    """Block kernels may compile (as in a run); each kernel the losses ask for is recorded as
    compiled or eager, and the compiled ones run eagerly here (no compile time)."""
    monkeypatch.setattr(_blockwise, "COMPILE_BLOCKS", True)
    made = _blockwise.block_kernel
    seen: list[bool] = []

    def recording(*args, **kwargs):
        kernel = made(*args, **kwargs)
        seen.append(isinstance(kernel, _compiling.Compiled))
        return kernel.eager if isinstance(kernel, _compiling.Compiled) else kernel

    monkeypatch.setattr(_blockwise, "block_kernel", recording)
    return seen


def _fused():
    torch.manual_seed(0)
    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(11, 4, requires_grad=True)
    return hidden, weight, torch.randn(6, 5), torch.randn(11, 5)


def _both_losses():
    hidden, weight, hidden_T, weight_T = _fused()
    fused = fused_linear_kd(hidden, weight, hidden_T, weight_T, loss="forward_kl")
    logits = torch.randn(6, 11, requires_grad=True)
    chunked = divergence("jsd", beta=0.5)(logits, torch.randn(6, 11))
    (fused + chunked).backward()
    return fused + chunked


def test_compile_false_runs_the_blocks_eagerly_forward_and_backward(kernels):
    eager_path = _compiling.compiled(_both_losses, enabled=False)
    eager_path()
    assert kernels and not any(kernels)  # every kernel, backward included, eager
    assert _compiling.blocks_may_compile()  # restored after the call


def test_the_setting_does_not_leak_into_a_later_call(kernels):
    _compiling.compiled(_both_losses, enabled=False)()
    kernels.clear()
    _both_losses()  # outside a compile=False loss path: compiled blocks, as before
    assert kernels and all(kernels)
    kernels.clear()
    with pytest.raises(RuntimeError, match="boom"):  # restored when the loss path raises too
        _compiling.compiled(lambda: (_both_losses(), _raise())[0], enabled=False)()
    assert _compiling.blocks_may_compile()
    _both_losses()
    assert kernels[-1] is True


def _raise():
    raise RuntimeError("boom")


def test_make_step_compile_false_keeps_the_fused_blocks_eager(kernels):
    import purekd

    torch.manual_seed(0)
    weight_S, weight_T = torch.nn.Linear(4, 11), torch.nn.Linear(5, 11)
    student, teacher = torch.nn.Linear(3, 4), torch.nn.Linear(3, 5)

    def adaptor(head):
        return lambda batch, hidden: {"lm_hidden": hidden, "lm_weight": head.weight,
                                      "lm_bias": head.bias}

    config = purekd.DistillationConfig(kd_loss_type="forward_kl", temperature=1)
    for compile_, expected in ((False, False), ("auto", True)):
        kernels.clear()
        step = purekd.make_step(config, teacher, student, adaptor(weight_T), adaptor(weight_S),
                                compile=compile_)
        step((torch.randn(6, 3),)).loss.backward()
        assert kernels and all(k is expected for k in kernels), compile_
