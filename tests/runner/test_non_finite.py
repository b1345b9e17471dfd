"""A non-finite loss stops training with NonFiniteLossError naming the global step and the term;
the checkpoints written before stay intact and none is written from non-finite weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import purekd
from purekd.runner import NonFiniteGuard

from ._helpers import (
    Tiny,
    adaptor,
    checkpoints,
    dataset,
    general_config,
    snapshot,
    train_config,
    use_runner,
)

BAD_BATCH = 4  # 0-based micro-batch index: optimizer step 5 (1-based) is the bad one


class Poisoned(Tiny):
    """Its hard-label loss is ``cross_entropy + 0 * poison``: NaN where ``poison`` is inf."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                poison: torch.Tensor | None = None) -> dict[str, Any]:
        result = super().forward(x, labels)
        if poison is not None:
            result["loss"] = result["loss"] + 0 * poison.sum()
        return result


def _data(where: str) -> TensorDataset:
    """12 samples in batches of 2; batch BAD_BATCH holds an inf in the inputs (``'x'``) or in
    the poison that only the hard-label loss sees (``'poison'``)."""
    x, labels = dataset(12).tensors
    poison = torch.zeros(12)
    target = x if where == "x" else poison
    target[2 * BAD_BATCH] = math.inf
    return TensorDataset(x, labels, poison)


def _distiller(out: Path, *, check_every_step: bool | None = None) -> Any:
    torch.manual_seed(0)
    teacher, student = Poisoned(8, 3), Poisoned(6, 2)
    distiller = purekd.GeneralDistiller(train_config(out, ckpt_steps=2), general_config(),
                                        teacher, student, adaptor, adaptor, compile=False)
    if check_every_step is not None:
        use_runner(distiller, check_finite_every_step=check_every_step)
    return distiller


def _train(distiller: Any, where: str, saved: dict[int, bytes], out: Path) -> None:
    student = distiller.model_S

    def callback(model, step):
        saved[step] = (out / f"gs{step}.pkl").read_bytes()

    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1),
                        DataLoader(_data(where), batch_size=2), num_steps=6, callback=callback)


@pytest.mark.parametrize(("where", "term"), [("x", None), ("poison", "hard_label_loss")])
def test_non_finite_loss_names_the_step_and_the_term(where: str, term: str | None,
                                                     tmp_path: Path) -> None:
    distiller = _distiller(tmp_path)
    saved: dict[int, bytes] = {}
    with pytest.raises(purekd.NonFiniteLossError) as info:
        _train(distiller, where, saved, tmp_path)
    error = info.value
    assert isinstance(error, ValueError) and isinstance(error, FloatingPointError)
    message = str(error)
    assert "global step 5" in message
    names = (term and [term]) or ["kd_loss", "hidden_hidden_mse_2_3", "hard_label_loss"]
    assert any(f"term {name!r}" in message for name in names), message
    if term is not None:  # the finite terms are not blamed
        assert "term 'kd_loss'" not in message

    assert checkpoints(tmp_path) == ["gs2.pkl", "gs4.pkl"]
    for step, content in saved.items():  # intact: byte for byte what was written
        assert (tmp_path / f"gs{step}.pkl").read_bytes() == content
    last = torch.load(tmp_path / "gs4.pkl", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last.values())
    # checked before every optimizer step (the CPU default): the bad gradients were never applied
    current = snapshot(distiller.model_S)
    assert all(torch.equal(current[k], last[k]) for k in last)


def test_without_per_step_checks_no_checkpoint_holds_non_finite_weights(tmp_path: Path) -> None:
    """``check_finite_every_step=False``: the check runs at the next checkpoint (step 6),
    before writing it; the error still names step 5."""
    distiller = _distiller(tmp_path, check_every_step=False)
    saved: dict[int, bytes] = {}
    with pytest.raises(purekd.NonFiniteLossError, match="global step 5"):
        _train(distiller, "x", saved, tmp_path)
    assert checkpoints(tmp_path) == ["gs2.pkl", "gs4.pkl"]
    assert all((tmp_path / f"gs{s}.pkl").read_bytes() == c for s, c in saved.items())


def test_guard_reports_the_first_bad_step() -> None:
    guard = NonFiniteGuard()
    ok = {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}
    guard.observe(1, torch.tensor(3.0), ok)
    guard.raise_if_tripped()  # all finite: nothing
    guard.observe(2, torch.tensor(3.0), ok)
    guard.observe(3, torch.tensor(math.inf), {"a": torch.tensor(1.0), "b": torch.tensor(math.inf)})
    guard.observe(4, torch.tensor(math.nan), {"a": torch.tensor(math.nan), "b": torch.tensor(1.0)})
    with pytest.raises(purekd.NonFiniteLossError, match=r"global step 3 \(term 'b'"):
        guard.raise_if_tripped()
    guard.raise_if_tripped()  # the record was cleared


def test_guard_names_the_total_when_no_term_is_bad() -> None:
    guard = NonFiniteGuard()
    guard.observe(7, torch.tensor(math.nan), {"a": torch.tensor(1.0)})
    with pytest.raises(purekd.NonFiniteLossError, match="global step 7 \\(term 'total loss'"):
        guard.raise_if_tripped()


def _named_with_gradients(**grads: torch.Tensor) -> list[tuple[str, torch.nn.Parameter]]:
    named = []
    for name, grad in grads.items():
        parameter = torch.nn.Parameter(torch.zeros_like(grad))
        parameter.grad = grad
        named.append((name, parameter))
    return named


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_gradient_check_names_every_non_finite_parameter(bad: float) -> None:
    guard = NonFiniteGuard()
    named = _named_with_gradients(w=torch.ones(3, 4), b=torch.tensor([1.0, bad]),
                                  h=torch.tensor([bad, 0.0], dtype=torch.float16))
    guard.observe_gradients(5, named)
    with pytest.raises(purekd.NonFiniteLossError,
                       match=r"gradient is not finite at global step 5 \(parameter 'b', and 1 more"):
        guard.raise_if_tripped()
    guard.raise_if_tripped()  # the record was cleared


def test_gradient_check_is_not_fooled_by_a_sum_that_overflows() -> None:
    # finite elements whose float32 sum overflows (and a float16 gradient whose float16 sum
    # would): the cheap flag trips, the exact check clears it
    huge = torch.full((4,), 3e38)
    half = torch.full((8,), 60000.0, dtype=torch.float16)
    assert not torch.isfinite(huge.sum()) and not torch.isfinite(half.sum())
    guard = NonFiniteGuard()
    guard.observe_gradients(1, _named_with_gradients(huge=huge, half=half))
    guard.raise_if_tripped()
