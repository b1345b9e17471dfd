"""Extending a run: resuming with a longer plan is refused by default (the plan is part of the
run's fingerprint); ``extend_run=True`` continues a finished or interrupted run for more steps,
bit for bit as if it had been started with the longer plan — the schedule here (StepLR, no
progress-dependent weight) does not depend on the plan's length."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from purekd.runner import StateError

from ._helpers import Stop, assert_state_equal, stop_at
from .test_integrity import _metrics, _resumed, _run, _seed
from .test_integrity import reference as reference  # the fixture


def _pkl(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("stopped", ["finished", "interrupted"])
def test_extend_a_run_to_more_steps(stopped: str, tmp_path: Path, reference) -> None:
    ref_dir, expected = reference  # num_steps=10 from the start
    _seed(7)
    if stopped == "finished":
        _run(tmp_path, num_steps=6, save_state=True)  # ends at 6: states at 3 and 6
        assert_state_equal(_pkl(tmp_path / "gs6.pkl"), _pkl(ref_dir / "gs6.pkl"))  # bit-exact
    else:
        with pytest.raises(Stop):  # stopped at 6 before its state: resumes from gs3
            _run(tmp_path, num_steps=6, save_state=True, callback=stop_at(6))
    assert_state_equal(_pkl(tmp_path / "gs3.pkl"), _pkl(ref_dir / "gs3.pkl"))

    with pytest.raises(StateError, match=r"plan: num_steps: 6 -> 10[\s\S]*pass extend_run=True"):
        _resumed(tmp_path, num_steps=10)  # the default: refused
    with pytest.raises(StateError, match="num_steps=4 is less than the saved run's 6"):
        _resumed(tmp_path, num_steps=4, extend_run=True)

    resumed = _resumed(tmp_path, num_steps=10, extend_run=True)
    assert_state_equal(resumed, expected)  # as if started with num_steps=10
    for name in ("gs9.pkl", "gs10.pkl"):
        assert_state_equal(_pkl(tmp_path / name), _pkl(ref_dir / name))
    assert _metrics(tmp_path) == _metrics(ref_dir)

    # the extended run is now the run of the directory, with the longer plan
    again = _resumed(tmp_path, num_steps=10)  # finished: nothing more to do, no refusal
    assert_state_equal(again, expected)


def test_extend_run_needs_resume_from(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="extend_run=True without resume_from"):
        _run(tmp_path, extend_run=True)
