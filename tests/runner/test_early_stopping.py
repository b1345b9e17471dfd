"""Early stopping and keep-best, evaluated at checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import purekd

from ._helpers import (
    Stop,
    adaptor,
    checkpoints,
    dataset,
    general_config,
    loader,
    models,
    train_config,
)


def _train(out: Path, values: list[float], early_stopping: purekd.EarlyStopping,
           num_steps: int = 10, use_callback: bool = True, stop_at: int | None = None,
           **train_kwargs: Any) -> list[int]:
    """Train with a checkpoint every step; the callback returns ``values`` in turn."""
    teacher, student = models()
    distiller = purekd.GeneralDistiller(train_config(out, ckpt_steps=1), general_config(),
                                        teacher, student, adaptor, adaptor, compile=False)
    seen: list[int] = []

    def callback(model: Any, step: int) -> float | None:
        seen.append(step)
        if step == stop_at:
            raise Stop(step)
        return values[step - 1] if use_callback else None

    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), loader(dataset(6)),
                        num_steps=num_steps, callback=callback, early_stopping=early_stopping,
                        **train_kwargs)
    return seen


def _same_file(a: Path, b: Path) -> None:
    assert a.read_bytes() == b.read_bytes()
    left, right = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert left.keys() == right.keys()
    assert all(torch.equal(left[k], right[k]) for k in left)


def test_stops_after_patience_stale_checkpoints_and_keeps_the_best(tmp_path: Path) -> None:
    values = [0.1, 0.5, 0.9, 0.8, 0.85, 0.95, 0.99, 1.0, 1.0, 1.0]
    seen = _train(tmp_path, values, purekd.EarlyStopping(patience=2, mode="max"))
    assert seen == [1, 2, 3, 4, 5]  # 0.8 and 0.85 do not beat 0.9: stop after step 5
    assert checkpoints(tmp_path) == [f"gs{s}.pkl" for s in range(1, 6)]
    _same_file(tmp_path / "best.pkl", tmp_path / "gs3.pkl")


def test_an_improvement_resets_the_patience(tmp_path: Path) -> None:
    values = [0.5, 0.4, 0.6, 0.3, 0.7, 0.2, 0.1, 0.0, 0.0, 0.0]
    seen = _train(tmp_path, values, purekd.EarlyStopping(patience=2, mode="max"))
    assert seen == [1, 2, 3, 4, 5, 6, 7]
    _same_file(tmp_path / "best.pkl", tmp_path / "gs5.pkl")


def test_mode_min_with_a_metric_function_and_min_delta(tmp_path: Path) -> None:
    losses = iter([1.0, 0.5, 0.45, 0.44, 0.3, 0.29, 0.28])
    calls: list[int] = []

    def metric(model: Any, step: int) -> float:
        calls.append(step)
        assert isinstance(model, torch.nn.Module)
        return next(losses)

    rule = purekd.EarlyStopping(metric=metric, patience=2, mode="min", min_delta=0.1)
    seen = _train(tmp_path, [], rule, use_callback=False)
    # 1.0 best; 0.5 best; 0.45, 0.44 within min_delta: stale twice -> stop at step 4
    assert seen == calls == [1, 2, 3, 4]
    _same_file(tmp_path / "best.pkl", tmp_path / "gs2.pkl")


def test_keep_best_without_patience_trains_to_the_end(tmp_path: Path) -> None:
    values = [0.3, 0.1, 0.2, 0.9, 0.5, 0.4]
    seen = _train(tmp_path, values, purekd.EarlyStopping(mode="max"), num_steps=6)
    assert seen == [1, 2, 3, 4, 5, 6]
    _same_file(tmp_path / "best.pkl", tmp_path / "gs4.pkl")


def test_non_finite_metric_never_improves(tmp_path: Path) -> None:
    values = [0.3, float("nan"), float("inf"), 0.1]
    seen = _train(tmp_path, values, purekd.EarlyStopping(patience=2), num_steps=4)
    assert seen == [1, 2, 3]
    _same_file(tmp_path / "best.pkl", tmp_path / "gs1.pkl")


def test_no_metric_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="EarlyStopping has no metric"):
        _train(tmp_path, [], purekd.EarlyStopping(patience=1), use_callback=False)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"patience": 0}, "patience=0"),
    ({"patience": 1.5}, "patience=1.5"),
    ({"mode": "maximum"}, "mode='maximum'"),
])
def test_bad_settings(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        purekd.EarlyStopping(**kwargs)


def test_resume_keeps_the_early_stopping_state(tmp_path: Path) -> None:
    """Interrupted at step 5 after two stale checkpoints (patience 3), resumed from the state of
    step 4: one more stale checkpoint stops training, and best.pkl still holds step 2."""
    values = [0.1, 0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0]
    rule = purekd.EarlyStopping(patience=3)
    with pytest.raises(Stop):
        _train(tmp_path, values, rule, stop_at=5, save_state=True)
    best = (tmp_path / "best.pkl").read_bytes()
    seen = _train(tmp_path, values, rule, resume_from=tmp_path, save_state=True)
    assert seen == [5]
    assert (tmp_path / "best.pkl").read_bytes() == best
    _same_file(tmp_path / "best.pkl", tmp_path / "gs2.pkl")
    state = torch.load(tmp_path / "gs5.state.pt", weights_only=True)["early_stopping"]
    assert state == {"best": 0.9, "best_step": 2, "stale": 3}
