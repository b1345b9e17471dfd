"""What is on disk can be trusted: a state belongs to one run and resume takes the latest state
of *this* run; damaged states are detected and skipped; a state that does not fit is refused
before anything is loaded; non-finite gradients or weights never reach a checkpoint; a torn
metrics line is tolerated; a killed write's temporary files go away; old states can be pruned;
resume skips data without loading it.

The runs are those of ``test_resume``'s ``_steps``: num_steps=10, checkpoints at 3, 6, 9, 10.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import purekd
from purekd.runner import StateError

from ._helpers import (
    Stop,
    Tiny,
    adaptor,
    assert_state_equal,
    dataset,
    general_config,
    models,
    snapshot,
    stop_at,
    train_config,
)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class Counted(Dataset):
    """A map-style dataset that counts the samples fetched."""

    def __init__(self, n: int = 10) -> None:
        self.data = dataset(n)
        self.fetched = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        self.fetched += 1
        return self.data[index]


def _run(out: Path, *, resume: bool = False, num_steps: int = 10, optimizer: str = "adam",
         scheduler: bool = True, width: int = 6, data: Dataset | None = None, lr: float = 3e-2,
         **train_kwargs: Any) -> tuple[Any, torch.nn.Module]:
    teacher, student = models(seed=0, dropout=0.3, width_S=width)
    if resume:
        torch.manual_seed(1234)
        student = Tiny(width, 2, dropout=0.3)
    distill = general_config(intermediate_matches=[
        {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
         "proj": ["linear", width, 8]}])
    distiller = purekd.GeneralDistiller(train_config(out, gradient_accumulation_steps=2,
                                                     ckpt_steps=3),
                                        distill, teacher, student, adaptor, adaptor,
                                        compile=False)
    opt = (torch.optim.Adam(student.parameters(), lr=lr) if optimizer == "adam"
           else torch.optim.SGD(student.parameters(), lr=lr))
    sched = {"scheduler_class": torch.optim.lr_scheduler.StepLR,
             "scheduler_args": {"step_size": 3, "gamma": 0.5}} if scheduler else {}
    with distiller:
        distiller.train(opt, DataLoader(data if data is not None else dataset(10), batch_size=2,
                                        shuffle=True), num_steps=num_steps, **sched,
                        **train_kwargs)
    return distiller, student


def _weights(distiller: Any, student: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {f"student.{k}": v for k, v in snapshot(student).items()}
    state.update({f"proj.{k}": v for k, v in snapshot(distiller.projs[0]).items()})
    return state


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("reference")
    _seed(7)
    return out, _weights(*_run(out))


def _interrupted(out: Path, at: int = 9, **kwargs: Any) -> None:
    """Run with full states until the callback of step ``at`` raises (states of 3, 6 before 9)."""
    _seed(7)
    with pytest.raises(Stop):
        _run(out, callback=stop_at(at), save_state=True, **kwargs)


def _resumed(out: Path, **kwargs: Any) -> dict[str, torch.Tensor]:
    _seed(99)
    return _weights(*_run(out, resume=True, resume_from=out, save_state=True, **kwargs))


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- which run a state belongs to --------------------------------------------------------------


def test_a_stale_older_run_in_the_same_directory_is_not_resumed(tmp_path: Path, reference) -> None:
    ref_dir, expected = reference
    _seed(7)
    _run(tmp_path, save_state=True)  # an older, finished run: states up to gs10
    older = {p.name: p.read_bytes() for p in tmp_path.glob("gs10.*")}
    with pytest.warns(UserWarning, match="already holds an earlier run's files"):
        _interrupted(tmp_path, at=6)  # the new run: its own gs3 state only
    assert len(list(tmp_path.glob("metrics.before-*.jsonl"))) == 1  # the old log set aside
    resumed = _resumed(tmp_path)  # from the new run's gs3, not the older run's gs10
    assert_state_equal(resumed, expected)
    assert _metrics(tmp_path) == _metrics(ref_dir)  # no line of the older run
    assert (tmp_path / "gs10.state.pt").read_bytes() != older["gs10.state.pt"]


def test_resume_refuses_when_no_state_of_this_run_exists(tmp_path: Path) -> None:
    _seed(7)
    _run(tmp_path, save_state=True)
    with pytest.warns(UserWarning, match="earlier run"):
        _interrupted(tmp_path, at=3)  # killed before its first state
    with pytest.raises(StateError, match=r"no usable state of this run.*another run"):
        _resumed(tmp_path)


@pytest.mark.parametrize(("change", "part"), [
    ({"num_steps": 12}, "plan"),
    ({"scheduler": False}, "scheduler"),
    ({"optimizer": "sgd"}, "optimizer"),
    ({"width": 5}, "parameters"),
    ({"data": dataset(12)}, "data"),
    ({"max_grad_norm": 0.5}, "options"),
])
def test_resume_of_a_different_run_is_refused_naming_what_differs(
        change: dict[str, Any], part: str, tmp_path: Path) -> None:
    _interrupted(tmp_path)
    with pytest.raises(StateError, match=rf"different run[\s\S]*{part}:") as info:
        _resumed(tmp_path, **change)
    assert "gs6.state.pt" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_changed_learning_rate_shows_both_values(tmp_path: Path) -> None:
    _interrupted(tmp_path)
    with pytest.raises(StateError, match=r"optimizer: .*groups\[0\]\.lr: 0\.03 -> 0\.05"):
        _resumed(tmp_path, lr=0.05)


@pytest.mark.parametrize("garbled", ['{"id": "3f2a', "[]", '{"id": ""}', '{"run": 1}'])
def test_an_unreadable_run_json_is_an_error_naming_it(garbled: str, tmp_path: Path) -> None:
    """run.json names the run whose states a resume takes. An older finished run left gs10 in
    the directory, the current run was stopped after its gs3: with run.json garbled, resuming
    took the latest state of any run — the older run's gs10 — and ended with its weights."""
    _seed(7)
    _run(tmp_path, save_state=True)  # the older run: states up to gs10
    with pytest.warns(UserWarning, match="earlier run"):
        _interrupted(tmp_path, at=6)  # this run: its gs3 only
    (tmp_path / "run.json").write_text(garbled)
    with pytest.raises(StateError, match=r"run\.json: (unreadable|not a run record)[\s\S]*"
                                         r"Name the state file to resume in resume_from"):
        _resumed(tmp_path)


def test_a_failed_resume_leaves_the_student_untouched(tmp_path: Path, monkeypatch) -> None:
    """Shapes, optimizer kind and groups are validated before anything is loaded, even for a
    state without a fingerprint (an older purekd's)."""
    _interrupted(tmp_path)
    path = tmp_path / "gs6.state.pt"
    saved = torch.load(path, weights_only=True)
    del saved["run"]
    torch.save(saved, path)
    teacher, student = models(seed=0)
    torch.manual_seed(3)
    student = Tiny(6, 2)
    before = snapshot(student)
    distiller = purekd.GeneralDistiller(train_config(tmp_path, gradient_accumulation_steps=2,
                                                     ckpt_steps=3), general_config(), teacher,
                                        student, adaptor, adaptor, compile=False)
    with distiller, pytest.warns(RuntimeWarning, match="without a run fingerprint"), \
            pytest.raises(StateError, match="optimizer: saved Adam, the run has SGD") as info:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1),
                        DataLoader(dataset(10), batch_size=2), num_steps=10,
                        scheduler_class=torch.optim.lr_scheduler.StepLR,
                        scheduler_args={"step_size": 3}, resume_from=path)
    assert "nothing was loaded" in str(info.value)
    assert_state_equal(snapshot(student), before)


# -- damaged states ----------------------------------------------------------------------------


def _flip(path: Path) -> None:
    """Garble 64 bytes in the middle of the largest tensor record."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_flip, _truncate, _empty], ids=["flipped", "truncated", "empty"])
def test_a_damaged_state_is_skipped_for_the_previous_good_one(damage: Any, tmp_path: Path,
                                                              reference) -> None:
    _, expected = reference
    _interrupted(tmp_path)
    damage(tmp_path / "gs6.state.pt")
    with pytest.warns(RuntimeWarning, match=r"gs6\.state\.pt.*(damaged|empty|truncated)"
                                            r"[\s\S]*previous good state, gs3\.state\.pt"):
        resumed = _resumed(tmp_path)
    assert_state_equal(resumed, expected)


@pytest.mark.parametrize("damage", [_flip, _truncate, _empty], ids=["flipped", "truncated", "empty"])
def test_a_damaged_state_named_explicitly_is_refused(damage: Any, tmp_path: Path) -> None:
    _interrupted(tmp_path)
    path = tmp_path / "gs6.state.pt"
    damage(path)
    with pytest.raises(StateError, match=r"gs6\.state\.pt: the state file is"):
        _seed(99)
        _run(tmp_path, resume=True, resume_from=path)


def test_every_state_damaged_is_refused(tmp_path: Path) -> None:
    _interrupted(tmp_path)
    for path in tmp_path.glob("*.state.pt"):
        _flip(path)
    with pytest.raises(StateError, match="no usable state of this run; damaged"):
        _resumed(tmp_path)


# -- non-finite gradients and weights ----------------------------------------------------------


class NaNGradient(Tiny):
    """Finite loss; from forward call ``bad`` on, the gradient of ``out.weight`` is NaN."""

    def __init__(self, *args: Any, bad: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls, self.bad = 0, bad

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        self.calls += 1
        result = super().forward(x, labels)
        if self.calls >= self.bad and torch.is_grad_enabled():
            result["logits"].register_hook(lambda g: g * math.nan)
        return result


@pytest.mark.parametrize("every_step", [True, False])
def test_a_nan_gradient_at_a_checkpoint_step_is_never_checkpointed(every_step: bool,
                                                                   tmp_path: Path) -> None:
    """The 4th optimizer step (a checkpoint step) gets a NaN gradient with a finite loss."""
    from ._helpers import use_runner

    torch.manual_seed(0)
    teacher, student = Tiny(8, 3), NaNGradient(6, 2, bad=4)
    distiller = purekd.GeneralDistiller(train_config(tmp_path, ckpt_steps=2), general_config(),
                                        teacher, student, adaptor, adaptor, compile=False)
    use_runner(distiller, check_finite_every_step=every_step)
    written: list[int] = []
    with distiller, pytest.raises(purekd.NonFiniteLossError) as info:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1),
                        DataLoader(dataset(12), batch_size=2), num_steps=6, save_state=True,
                        callback=lambda model, step: written.append(step))
    message = str(info.value)
    if every_step:  # caught before the optimizer step: weights are those after step 3
        assert "gradient is not finite at global step 4" in message
        assert "Training stopped before that optimizer step" in message
    else:  # caught in the weights before the checkpoint of step 4 is written
        assert "weights are not finite after global step 4" in message
    assert written == [2]
    assert sorted(p.name for p in tmp_path.glob("gs*")) == ["gs2.pkl", "gs2.state.pt"]
    for value in torch.load(tmp_path / "gs2.pkl", weights_only=True).values():
        assert torch.isfinite(value).all()


# -- metrics, temporary files, pruning, skipping -----------------------------------------------


def test_a_torn_metrics_line_does_not_stop_a_resume(tmp_path: Path, reference) -> None:
    ref_dir, expected = reference
    _interrupted(tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"step": 17, "global_st')  # a write cut short
    with pytest.warns(RuntimeWarning, match="unreadable line"):
        resumed = _resumed(tmp_path)
    assert_state_equal(resumed, expected)
    assert _metrics(tmp_path) == _metrics(ref_dir)


def test_a_torn_metrics_line_is_cut_before_appending(tmp_path: Path) -> None:
    from purekd.runner import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo')
    log = MetricsLogger(tmp_path, None)
    log.record(1, 0, torch.tensor(2.0), {})
    with pytest.warns(RuntimeWarning, match="torn last line"):
        log.flush()
    assert [json.loads(line)["step"] for line in
            (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_temporary_files_of_a_killed_write_are_removed_at_start(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    leftovers = [".gs4.state.pt.k2j3.tmp", ".gs4.pkl.x9.tmp", ".best.pkl.tmp", "metrics.jsonl.tmp"]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"PK partial")
    (tmp_path / "notes.tmp").write_text("not ours")
    _seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(tmp_path, num_steps=3)
    names = {p.name for p in tmp_path.iterdir()}
    assert not names & set(leftovers)
    assert "notes.tmp" in names


def test_keep_last_states(tmp_path: Path, reference) -> None:
    _, expected = reference
    _interrupted(tmp_path, keep_last_states=1)
    assert sorted(p.name for p in tmp_path.glob("*.state.pt")) == ["gs6.state.pt"]
    resumed = _resumed(tmp_path, keep_last_states=2)
    assert_state_equal(resumed, expected)
    assert sorted(p.name for p in tmp_path.glob("*.state.pt")) == ["gs10.state.pt", "gs9.state.pt"]
    with pytest.raises(ValueError, match="keep_last_states=0"):
        _run(tmp_path / "other", keep_last_states=0)


def test_resume_skips_the_data_at_index_level(tmp_path: Path, reference) -> None:
    """Resuming at step 6 of 10 fetches only the samples still to train on, and stays exact."""
    _, expected = reference
    _interrupted(tmp_path, data=Counted())
    data = Counted()
    resumed = _resumed(tmp_path, data=data)
    assert_state_equal(resumed, expected)
    # 4 optimizer steps x 2 micro-batches x 2 samples are left; 6 steps' worth were skipped
    assert data.fetched == 4 * 2 * 2


def test_a_fresh_run_in_a_used_directory_can_refuse_or_overwrite(tmp_path: Path) -> None:
    _seed(7)
    _run(tmp_path, save_state=True)
    with pytest.raises(ValueError, match="overwrite_output_dir=True"):
        _run(tmp_path, overwrite_output_dir=False)
    _seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(tmp_path, num_steps=3, overwrite_output_dir=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gs3.pkl", "metrics.jsonl"]
