"""Full-state resume: a run interrupted at step k and resumed with ``resume_from`` ends with
weights bit-identical to an uninterrupted run.

Each run builds everything from scratch (models, distiller, optimizer, loader). The resumed
run starts from a *different* student initialisation and *different* global seeds, so its
weights, optimizer moments, scheduler position, RNG streams and data order can only come from
the state file. The interrupted run stops by raising from the callback; the state file of that
checkpoint is written after the callback returns, so the run resumes from the checkpoint before.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import purekd

from ._helpers import (
    Stop,
    Tiny,
    adaptor,
    assert_state_equal,
    checkpoints,
    dataset,
    general_config,
    loader,
    models,
    snapshot,
    stop_at,
    train_config,
)

SCHEDULED = {"kd_loss_weight_scheduler": "linear_decay",
             "hard_label_weight_scheduler": "linear_growth"}


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _student(resume: bool, dropout: float) -> torch.nn.Module:
    teacher, student = models(seed=0, dropout=dropout)
    del teacher
    if resume:  # other initial weights: the state file must supply them
        torch.manual_seed(1234)
        student = Tiny(6, 2, dropout=dropout)
    return student


def _optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=3e-2)


def _epochs(out: Path, resume: bool, dropout: float = 0.3, own_generator: bool = False,
            **train_kwargs: Any) -> tuple[Any, torch.nn.Module]:
    """GeneralDistiller, epochs, shuffled loader (9 batches), accumulation 2 (a leftover
    micro-batch per epoch), StepLR, clipping, Adam, dropout, weight schedulers; checkpoints at
    every other step (2, 4, ..., 12). ``own_generator``: the loader shuffles with its own
    ``torch.Generator`` instead of the global one."""
    teacher, _ = models(seed=0)
    student = _student(resume, dropout)
    config = train_config(out, gradient_accumulation_steps=2, ckpt_frequency=2)
    distiller = purekd.GeneralDistiller(config, general_config(**SCHEDULED), teacher, student,
                                        adaptor, adaptor, compile=False)
    optimizer = _optimizer(student.parameters())
    with distiller:
        data = loader(dataset(18), batch_size=2, shuffle=True)
        if own_generator:
            data = DataLoader(dataset(18), batch_size=2, shuffle=True,
                              generator=torch.Generator().manual_seed(3))
        distiller.train(optimizer, data, num_epochs=3,
                        scheduler_class=torch.optim.lr_scheduler.StepLR,
                        scheduler_args={"step_size": 3, "gamma": 0.5}, max_grad_norm=1.0,
                        **train_kwargs)
    return distiller, student


def _steps(out: Path, resume: bool, dropout: float = 0.3, **train_kwargs: Any) -> tuple[Any, torch.nn.Module]:
    """GeneralDistiller, num_steps=10 over a cycled shuffled loader of 5 batches (accumulation
    windows straddle passes), checkpoints every 3 steps and at the end (3, 6, 9, 10)."""
    teacher, _ = models(seed=0)
    student = _student(resume, dropout)
    config = train_config(out, gradient_accumulation_steps=2, ckpt_steps=3)
    distiller = purekd.GeneralDistiller(config, general_config(**SCHEDULED), teacher, student,
                                        adaptor, adaptor, compile=False)
    optimizer = _optimizer(student.parameters())
    with distiller:
        distiller.train(optimizer, loader(dataset(10), batch_size=2, shuffle=True), num_steps=10,
                        scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                        scheduler_args={"lr_lambda": lambda s: 1 / (1 + s)}, **train_kwargs)
    return distiller, student


def _caching(out: Path, resume: bool, dropout: float = 0.3, **train_kwargs: Any) -> tuple[Any, torch.nn.Module]:
    """BasicDistiller with is_caching_logits=True: cached batches reshuffled by Python's
    ``random`` each epoch; 6 steps per epoch, 2 epochs, checkpoints at 3, 6, 9, 12."""
    teacher, _ = models(seed=0)
    student = _student(resume, dropout)
    config = train_config(out, ckpt_frequency=2)
    distill = purekd.DistillationConfig(temperature=2, hard_label_weight=0.5,
                                        is_caching_logits=True, **SCHEDULED)
    distiller = purekd.BasicDistiller(config, distill, teacher, student, adaptor, adaptor,
                                      compile=False)
    optimizer = _optimizer(student.parameters())
    with distiller:
        distiller.train(optimizer, loader(dataset(12), batch_size=2, shuffle=True), num_epochs=2,
                        **train_kwargs)
    return distiller, student


def _multitask(out: Path, resume: bool, dropout: float = 0.3, **train_kwargs: Any) -> tuple[Any, torch.nn.Module]:
    """MultiTaskDistiller: two tasks sampled with NumPy, num_steps=8, checkpoints every 2."""
    teacher_a, _ = models(seed=0)
    teacher_b, _ = models(seed=1)
    student = _student(resume, dropout)
    config = train_config(out, ckpt_steps=2)
    distiller = purekd.MultiTaskDistiller(
        config, general_config(**SCHEDULED), {"a": teacher_a, "b": teacher_b}, student,
        {"a": adaptor, "b": adaptor}, {"a": adaptor, "b": adaptor}, compile=False)
    optimizer = _optimizer(student.parameters())
    loaders = {"a": loader(dataset(8, seed=1), batch_size=2, shuffle=True),
               "b": loader(dataset(12, seed=2), batch_size=3, shuffle=True)}
    with distiller:
        distiller.train(optimizer, loaders, num_steps=8, tau=0.5, **train_kwargs)
    return distiller, student


Build = Callable[..., tuple[Any, torch.nn.Module]]

CASES = {
    # name: (build, interrupt at, state expected to resume from, all checkpoint steps)
    "epochs": (_epochs, 8, 6, [2, 4, 6, 8, 10, 12]),
    "epochs_own_generator": (functools.partial(_epochs, own_generator=True), 8, 6,
                             [2, 4, 6, 8, 10, 12]),
    "num_steps": (_steps, 9, 6, [3, 6, 9, 10]),
    "caching": (_caching, 9, 6, [3, 6, 9, 12]),
    "multitask": (_multitask, 6, 4, [2, 4, 6, 8]),
}


def _result(distiller: Any, student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The student's and the projections' weights."""
    state = {f"student.{k}": v for k, v in snapshot(student).items()}
    for index, proj in enumerate(getattr(distiller, "projs", [])):
        if proj is not None:
            state.update({f"proj{index}.{k}": v for k, v in snapshot(proj).items()})
    return state


PARAMS = [
    pytest.param(case, dropout, id=f"{case}-{'dropout' if dropout else 'no_dropout'}")
    for case in CASES for dropout in (0.0, 0.3)
]


@pytest.mark.parametrize(("case", "dropout"), PARAMS)
def test_interrupted_and_resumed_run_is_bit_identical(case: str, dropout: float,
                                                      tmp_path: Path) -> None:
    build, interrupt, resumes_at, ckpt_steps = CASES[case]

    _seed(7)
    seen: list[int] = []
    reference = _result(*build(tmp_path / "ref", False, dropout,
                               callback=stop_at(None, seen)))
    assert seen == ckpt_steps

    out = tmp_path / "run"
    _seed(7)
    with pytest.raises(Stop):
        build(out, False, dropout, callback=stop_at(interrupt), save_state=True)
    states = sorted(p.name for p in out.glob("*.state.pt"))
    assert states == sorted(f"gs{s}.state.pt" for s in ckpt_steps if s < interrupt)
    assert f"gs{interrupt}.pkl" in checkpoints(out)  # weights were saved, the state was not

    logged = len(_metrics(out))
    resumed_from = torch.load(out / f"gs{resumes_at}.state.pt", weights_only=True)["counters"]

    _seed(99)  # other seeds: the state must restore every generator
    seen = []
    resumed = _result(*build(out, True, dropout, callback=stop_at(None, seen), resume_from=out,
                             save_state=True))
    assert seen == [s for s in ckpt_steps if s > resumes_at]
    assert_state_equal(resumed, reference)
    for step in seen:  # every checkpoint after the resume point is the reference's
        assert_state_equal(torch.load(out / f"gs{step}.pkl", weights_only=True),
                           torch.load(tmp_path / "ref" / f"gs{step}.pkl", weights_only=True))
    # the log keeps the lines up to the resume point, drops the redone ones, and goes on with
    # the reference's losses: the whole file equals the uninterrupted run's
    assert logged > resumed_from["writer_step"]
    assert _metrics(out) == _metrics(tmp_path / "ref")


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_from_an_explicit_state_file(tmp_path: Path) -> None:
    """``resume_from`` may name a state file (here an older one than the latest)."""
    _seed(7)
    reference = _result(*_steps(tmp_path / "ref", False, 0.0))
    out = tmp_path / "run"
    _seed(7)
    _steps(out, False, 0.0, save_state=True)  # a complete run; resume from its step-3 state
    _seed(5)
    resumed = _result(*_steps(out, True, 0.0, resume_from=out / "gs3.state.pt"))
    assert_state_equal(resumed, reference)


def test_resume_of_a_finished_num_steps_run_changes_nothing(tmp_path: Path) -> None:
    _seed(7)
    out = tmp_path / "run"
    finished = _result(*_steps(out, False, save_state=True))
    _seed(5)
    seen: list[int] = []
    again = _result(*_steps(out, True, resume_from=out, callback=stop_at(None, seen)))
    assert seen == []
    assert_state_equal(again, finished)


def test_state_files_load_with_weights_only(tmp_path: Path) -> None:
    _seed(7)
    _steps(tmp_path, False, save_state=True)
    state = torch.load(tmp_path / "gs10.state.pt", weights_only=True)
    assert {"step", "optimizer", "scheduler", "rng", "counters"} <= set(state)
    assert state["counters"]["global_step"] == 10


def test_resume_from_a_directory_without_state_files(tmp_path: Path) -> None:
    _seed(7)
    _steps(tmp_path, False)  # save_state=False: only weights
    with pytest.raises(FileNotFoundError, match="save_state=True"):
        _steps(tmp_path, True, resume_from=tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        _steps(tmp_path, True, resume_from=tmp_path / "missing")
