"""A divergence declared once with ``register_divergence`` works everywhere a built-in does.

The squared Hellinger distance, registered here with no hand-written gradient, is used by name
through the dense, chunked, fused and top-k forms (values and gradients equal a float64
reference), through ``DistillationConfig(kd_loss_type=...)`` in a ``GeneralDistiller`` run
(token-normalised), and its fused form holds no ``(N, V)`` tensor."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import purekd
from purekd import losses, presets
from purekd.losses import _blockwise
from purekd.losses._family import divergence_loss
from purekd.losses._topk import topk_loss
from tests.conftest import count_graph_breaks, generator

N, H, V = 40, 6, 33


def hellinger_rows(log_p_S: Tensor, log_p_T: Tensor, *, scale: float = 1.0) -> Tensor:
    r"""\(\tfrac{s}{2}\sum_v (\sqrt{p^S_v} - \sqrt{p^T_v})^2\)"""
    return 0.5 * scale * ((0.5 * log_p_S).exp() - (0.5 * log_p_T).exp()).pow(2).sum(-1)


def check_scale(*, scale: float) -> None:
    if not scale > 0:
        raise ValueError(f"scale={scale!r} must be > 0")


@pytest.fixture
def hellinger() -> Iterator[str]:
    losses.register_divergence("hellinger", hellinger_rows, defaults={"scale": 1.0},
                               check=check_scale, topk=True)
    try:
        yield "hellinger"
    finally:
        losses.unregister_divergence("hellinger")


@pytest.fixture(autouse=True)
def _eager_blocks(monkeypatch):
    monkeypatch.setattr(_blockwise, "COMPILE_BLOCKS", False)


def reference(logits_S: Tensor, logits_T: Tensor, mask: Tensor, temperature: float = 1.0,
              scale: float = 1.0) -> Tensor:
    """The float64 formula by hand: mean over the kept rows."""
    p_S = torch.softmax(logits_S.double() / temperature, -1)
    p_T = torch.softmax(logits_T.double() / temperature, -1)
    rows = 0.5 * scale * (p_S.sqrt() - p_T.sqrt()).pow(2).sum(-1)
    keep = mask.double()
    return (rows * keep).sum() / keep.sum()


def data(seed: int = 0, dtype: torch.dtype = torch.float32):
    gen = generator(seed)
    h_S = torch.randn(N, H, generator=gen, dtype=dtype)
    w_S = torch.randn(V, H, generator=gen, dtype=dtype) * 0.6
    h_T = torch.randn(N, H, generator=gen, dtype=dtype)
    w_T = torch.randn(V, H, generator=gen, dtype=dtype) * 0.8
    mask = (torch.rand(N, generator=gen) > 0.3).long()
    return h_S, w_S, h_T, w_T, mask


def grads(fn, *leaves: Tensor) -> tuple[Tensor, ...]:
    leaves = tuple(x.detach().clone().requires_grad_(True) for x in leaves)
    value = fn(*leaves)
    return (value.double(), *(g.double() for g in torch.autograd.grad(value, leaves)))


def test_the_name_is_everywhere_after_one_call(hellinger):
    assert "hellinger" in presets.KD_LOSS_MAP
    assert presets.TOKEN_KD_LOSSES["hellinger"] == {"scale": 1.0, "tail": False}
    assert presets.TOPK_FORMS["hellinger"] == "topk_hellinger"
    assert presets.KD_LOSS_MAP["hellinger"] is losses.divergence("hellinger")
    assert "| `hellinger(scale=1.0)` |" in losses.divergence_table()
    config = purekd.DistillationConfig(kd_loss_type=["hellinger", {"scale": 2.0}], temperature=1)
    assert config.kd_loss == ("hellinger", {"scale": 2.0}) and config.normalises_by_tokens
    with pytest.raises(ValueError, match=r"scale=-1.*must be > 0.*\{'scale': 1.0\}"):
        purekd.DistillationConfig(kd_loss_type=["hellinger", -1])
    with pytest.raises(ValueError, match="scale=0"):
        losses.divergence("hellinger", scale=0)
    with pytest.raises(TypeError, match=r"no argument\(s\) \['beta'\]"):
        losses.divergence("hellinger", beta=0.5)


def test_unregistered_it_is_gone(hellinger):
    losses.unregister_divergence("hellinger")
    try:
        assert "hellinger" not in presets.KD_LOSS_MAP
        with pytest.raises(ValueError, match="unknown kd_loss_type 'hellinger'"):
            purekd.DistillationConfig(kd_loss_type="hellinger")
    finally:
        losses.register_divergence("hellinger", hellinger_rows, defaults={"scale": 1.0},
                                   check=check_scale, topk=True)


def test_registration_errors(hellinger):
    with pytest.raises(ValueError, match="already registered"):
        losses.register_divergence("hellinger", hellinger_rows)
    with pytest.raises(ValueError, match="built-in"):
        losses.unregister_divergence("forward_kl")
    with pytest.raises(ValueError, match="scale=0"):
        losses.register_divergence("other", hellinger_rows, defaults={"scale": 0},
                                   check=check_scale)
    with pytest.raises(ValueError, match="'tail'"):
        losses.register_divergence("other", hellinger_rows, defaults={"tail": 1})
    assert "other" not in presets.KD_LOSS_MAP


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("form", ["dense", "chunked", "fused"])
def test_values_and_gradients_equal_a_float64_reference(hellinger, form, temperature):
    h_S, w_S, h_T, w_T, mask = data()
    want = grads(lambda h, w: reference(h @ w.T, h_T @ w_T.T, mask, temperature, 1.5), h_S, w_S)
    if form == "fused":
        fn = lambda h, w: losses.fused_linear_kd(  # noqa: E731
            h, w, h_T, w_T, loss="hellinger", scale=1.5, temperature=temperature, mask=mask,
            chunk_rows=7)
    else:
        fn = lambda h, w: divergence_loss(  # noqa: E731
            "hellinger", h @ w.T, h_T @ w_T.T, temperature=temperature, mask=mask, scale=1.5,
            chunk_rows=7 if form == "chunked" else None)
    got = grads(fn, h_S, w_S)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=1e-6)
    # float64 inputs: float64 all the way, equal to the reference to rounding
    h_S, w_S, h_T, w_T = (x.double() for x in (h_S, w_S, h_T, w_T))
    want = grads(lambda h, w: reference(h @ w.T, h_T @ w_T.T, mask, temperature, 1.5), h_S, w_S)
    for g, w in zip(grads(fn, h_S, w_S), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_public_function_and_the_topk_form_with_every_id(hellinger):
    h_S, w_S, h_T, w_T, mask = data(1)
    logits_S, logits_T = h_S @ w_S.T, h_T @ w_T.T
    dense = losses.divergence("hellinger", scale=1.5)(logits_S, logits_T, mask=mask)
    torch.testing.assert_close(dense.double(), reference(logits_S, logits_T, mask, scale=1.5),
                               rtol=2e-6, atol=1e-7)
    logprobs, ids = logits_T.log_softmax(-1).topk(V, dim=-1)  # k = V: the top-k form is dense
    for tail in (False, True):
        got = grads(lambda s, tail=tail: topk_loss("topk_hellinger", s, ids, logprobs, tail=tail,
                                                   mask=mask, chunk_rows=9), logits_S)
        want = grads(lambda s: reference(s, logits_T, mask), logits_S)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=2e-5, atol=1e-6)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation creates."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest(fn, *leaves: Tensor) -> int:
    leaves = tuple(x.detach().clone().requires_grad_(True) for x in leaves)
    with LargestTensor() as probe:
        fn(*leaves).backward()
    return probe.largest


def test_the_fused_form_holds_no_n_by_v_tensor(hellinger):
    """Every tensor created in forward and backward (blocks computed eagerly, so every
    intermediate of the autograd-in-the-block gradient is seen) is counted."""
    h_S, w_S, h_T, w_T, mask = data(2)
    chunk = 8
    fused = _largest(lambda h, w: losses.fused_linear_kd(h, w, h_T, w_T, loss="hellinger",
                                                         mask=mask, chunk_rows=chunk), h_S, w_S)
    materialised = _largest(lambda h, w: divergence_loss("hellinger", h @ w.T, h_T @ w_T.T,
                                                         mask=mask), h_S, w_S)
    assert materialised >= N * V
    assert fused <= max(chunk * V, V * H, N * H) < N * V


def test_a_general_distiller_trains_with_it_by_name(hellinger, tmp_path):
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.body, self.out = nn.Linear(H, width), nn.Linear(width, V)

        def forward(self, x: Tensor, mask: Tensor) -> dict[str, Tensor]:
            return {"logits": self.out(torch.tanh(self.body(x)))}

    teacher, student = LM(9), LM(5)
    x = torch.randn(4, 5, H)
    mask = (torch.rand(4, 5) > 0.3).long()

    def adaptor(batch, outputs):
        return {"logits": outputs["logits"], "logits_mask": batch[1]}

    with torch.no_grad():
        logits_T = teacher(x, mask)["logits"]
    start = {k: v.detach().clone() for k, v in student.named_parameters()}
    loss = reference(student(x, mask)["logits"], logits_T, mask, temperature=2.0, scale=1.5)
    expected = dict(zip(start, torch.autograd.grad(loss, list(student.parameters())),
                        strict=True))
    config = purekd.DistillationConfig(kd_loss_type=["hellinger", {"scale": 1.5}], temperature=2)
    train = purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path))
    distiller = purekd.GeneralDistiller(train, config, teacher, student, adaptor, adaptor,
                                        compile=False)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.5), [(x, mask)], num_steps=1)
    for key, param in student.named_parameters():
        torch.testing.assert_close(param.detach().double(),
                                   (start[key] - 0.5 * expected[key]).double(),
                                   rtol=1e-5, atol=1e-6)


def test_no_graph_break(hellinger):
    h_S, w_S, h_T, w_T, mask = data(3)
    loss = losses.divergence("hellinger")
    assert count_graph_breaks(lambda s, t: loss(s, t, mask=mask), h_S @ w_S.T, h_T @ w_T.T) == 0
    assert count_graph_breaks(lambda h: losses.fused_linear_kd(  # vjp inside each block
        h, w_S, h_T, w_T, loss="hellinger", mask=mask, chunk_rows=8), h_S) == 0


def test_the_docs_table_is_the_registry():
    """docs/losses.md holds the generated table verbatim: a divergence added or changed in the
    registry without the docs fails here (regenerate with ``losses.divergence_table()``)."""
    page = (Path(__file__).parents[2] / "docs" / "losses.md").read_text()
    start, end = "<!-- divergence-table: start -->\n", "<!-- divergence-table: end -->"
    assert start in page and end in page
    table = page.split(start, 1)[1].split(end, 1)[0]
    assert table == losses.divergence_table(), (
        "regenerate the table in docs/losses.md from purekd.losses.divergence_table()")


def test_compiled_block_kernels_take_the_gradient_too(hellinger, monkeypatch):
    monkeypatch.setattr(_blockwise, "COMPILE_BLOCKS", True)
    h_S, w_S, h_T, w_T, mask = (x.double() if x.is_floating_point() else x for x in data(4))
    want = grads(lambda h, w: reference(h @ w.T, h_T @ w_T.T, mask), h_S, w_S)
    got = grads(lambda h, w: losses.fused_linear_kd(h, w, h_T, w_T, loss="hellinger", mask=mask,
                                                    chunk_rows=16), h_S, w_S)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_a_hand_written_gradient_is_used_and_agrees():
    calls = []

    def gradient(log_p_S, log_p_T, grad_S, grad_T, *, scale):
        calls.append(grad_S)
        root_S, root_T = (0.5 * log_p_S).exp(), (0.5 * log_p_T).exp()
        value = 0.5 * scale * (root_S - root_T).pow(2).sum(-1)
        a_S = 0.5 * scale * (log_p_S.exp() - root_S * root_T) if grad_S else None
        a_T = 0.5 * scale * (log_p_T.exp() - root_S * root_T) if grad_T else None
        return value, a_S, a_T

    losses.register_divergence("hellinger_hand", hellinger_rows, defaults={"scale": 1.0},
                               gradient=gradient)
    try:
        h_S, w_S, h_T, w_T, mask = (x.double() if x.is_floating_point() else x for x in data(5))
        want = grads(lambda h, w: reference(h @ w.T, h_T @ w_T.T, mask, 1.5, 2.0), h_S, w_S)
        got = grads(lambda h, w: losses.fused_linear_kd(
            h, w, h_T, w_T, loss="hellinger_hand", scale=2.0, temperature=1.5, mask=mask,
            chunk_rows=16), h_S, w_S)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
        assert True in calls  # the fused form took the hand-written gradient
    finally:
        losses.unregister_divergence("hellinger_hand")
