"""Logging: TensorBoard scalars (TextBrewer's tags), ``metrics.jsonl``, host copies only at
logging steps, and the progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import purekd
from purekd.runner import MetricsLogger, NonFiniteGuard

from ._helpers import (
    adaptor,
    dataset,
    general_config,
    loader,
    models,
    train_config,
    use_runner,
)

TERMS = ["kd_loss", "hidden_hidden_mse_2_3", "hard_label_loss"]


def _distiller(out: Path, **config: Any) -> tuple[Any, nn.Module]:
    teacher, student = models()
    distiller = purekd.GeneralDistiller(train_config(out, **config), general_config(), teacher,
                                        student, adaptor, adaptor, compile=False)
    return distiller, student


def _train(distiller: Any, student: nn.Module, num_steps: int = 4, **kwargs: Any) -> None:
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1),
                        loader(dataset(8), batch_size=2), num_steps=num_steps, **kwargs)


def _jsonl(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_scalars_and_metrics_jsonl(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, logs = tmp_path / "out", tmp_path / "logs"
    distiller, student = _distiller(out, log_dir=str(logs), gradient_accumulation_steps=2,
                                    ckpt_steps=2)
    first = dataset(8)[0:2]
    expected_first = distiller.step(first, progress=0.0)  # the loss of the first micro-batch
    _train(distiller, student, num_steps=3)  # 6 micro-batches

    records = _jsonl(out)
    assert [r["step"] for r in records] == list(range(6))
    assert [r["global_step"] for r in records] == [0, 0, 1, 1, 2, 2]
    for record in records:
        assert set(TERMS) <= set(record) and "loss" in record
    assert records[0]["loss"] == pytest.approx(expected_first.loss.item(), abs=1e-6)
    for name in TERMS:
        assert records[0][name] == pytest.approx(expected_first.terms[name].item(), abs=1e-6)

    events = EventAccumulator(str(logs))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"scalar/total_loss", "scalar/lr", *(f"scalar/unweighted_{t}" for t in TERMS)} <= tags
    totals = events.Scalars("scalar/total_loss")
    assert [e.step for e in totals] == list(range(6))
    assert [e.value for e in totals] == pytest.approx([r["loss"] for r in records], abs=1e-6)
    for name in TERMS:
        scalars = events.Scalars(f"scalar/unweighted_{name}")
        assert [e.step for e in scalars] == list(range(6))
        assert [e.value for e in scalars] == pytest.approx([r[name] for r in records], abs=1e-6)
    assert [e.value for e in events.Scalars("scalar/lr")] == pytest.approx([0.1] * len(
        events.Scalars("scalar/lr")))


def test_no_log_dir_writes_no_event_files(tmp_path: Path) -> None:
    distiller, student = _distiller(tmp_path)
    _train(distiller, student)
    assert not list(tmp_path.rglob("events.out.tfevents*"))
    assert len(_jsonl(tmp_path)) == 4


class _Recording(nn.Module):
    """Wraps a step; keeps (strong references to) every loss and term tensor it returns."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.outputs: list[torch.Tensor] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        self.outputs += [out.loss, *out.terms.values()]
        return out


HOST_COPIES = ("item", "cpu", "tolist", "numpy", "__float__", "__bool__")


def test_losses_reach_the_host_only_at_logging_steps(tmp_path: Path, monkeypatch) -> None:
    """log_every=3, checkpoints every 4 steps, per-step finiteness checks off: the buffered losses
    are flushed (one host copy) at steps 3, 6, 9 (logging), 4, 8, 10 (checkpoints) and at the
    end; no loss or term tensor is ever copied to the host by itself."""
    distiller, student = _distiller(tmp_path, gradient_accumulation_steps=2, ckpt_steps=4)
    recording = _Recording(distiller.step)
    runners: list[Any] = []
    use_runner(distiller, log_every=3, check_finite_every_step=False)
    build = distiller._runner

    def build_recording(*args: Any, **kwargs: Any) -> Any:
        runner = build(*args, **kwargs)
        runner.step = recording
        runners.append(runner)
        return runner

    distiller._runner = build_recording

    phase: list[str] = []  # non-empty inside a flush or a finiteness check
    flushes: list[tuple[int, int]] = []  # (global step, micro-batches flushed)
    checks: list[int] = []
    real_flush, real_check = MetricsLogger.flush, NonFiniteGuard.raise_if_tripped

    def flush(self: MetricsLogger, *args: Any, **kwargs: Any) -> None:
        flushes.append((runners[0].counters.global_step, len(self._pending)))
        phase.append("flush")
        try:
            real_flush(self, *args, **kwargs)
        finally:
            phase.pop()

    def check(self: NonFiniteGuard) -> None:
        checks.append(runners[0].counters.global_step)
        phase.append("check")
        try:
            real_check(self)
        finally:
            phase.pop()

    stray: list[tuple[str, int]] = []

    def watch(name: str) -> None:
        real = getattr(torch.Tensor, name)

        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not phase and any(self is t or _same_storage(self, t) for t in recording.outputs):
                stray.append((name, runners[0].counters.global_step))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, method)

    monkeypatch.setattr(MetricsLogger, "flush", flush)
    monkeypatch.setattr(NonFiniteGuard, "raise_if_tripped", check)
    for name in HOST_COPIES:
        watch(name)
    _train(distiller, student, num_steps=10)
    monkeypatch.undo()

    assert len(recording.outputs) == 20 * (1 + len(TERMS))
    assert stray == []
    assert flushes == [(3, 6), (4, 2), (6, 4), (8, 4), (9, 2), (10, 2), (10, 0)]
    assert sorted(set(checks)) == [3, 4, 6, 8, 9, 10]
    assert len(_jsonl(tmp_path)) == 20


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except RuntimeError:
        return False


def test_progress_bar_on_stderr(tmp_path: Path, capsys) -> None:
    pytest.importorskip("tqdm")
    distiller, student = _distiller(tmp_path)
    _train(distiller, student, progress_bar=True)
    captured = capsys.readouterr()
    assert "4/4" in captured.err and "training" in captured.err
    assert "4/4" not in captured.out


def test_progress_bar_through_the_runner(tmp_path: Path, capsys) -> None:
    pytest.importorskip("tqdm")
    distiller, student = _distiller(tmp_path)
    use_runner(distiller, progress_bar=True)
    _train(distiller, student)
    assert "4/4" in capsys.readouterr().err


@pytest.mark.parametrize("progress_bar", [None, False])
def test_no_progress_bar_when_stderr_is_not_a_terminal(progress_bar: bool | None,
                                                       tmp_path: Path, capfd) -> None:
    import sys

    assert not sys.stderr.isatty()  # captured by pytest
    distiller, student = _distiller(tmp_path)
    _train(distiller, student, progress_bar=progress_bar)
    captured = capfd.readouterr()
    assert "training" not in captured.err and "4/4" not in captured.err
