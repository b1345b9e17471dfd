"""``RunOptions``: the options of one ``train()`` call, one validated record — purekd's options
taken out of TextBrewer's ``**args`` by name, every other keyword a model argument, each option
checked once with its own message."""

from __future__ import annotations

from typing import Any

import pytest

from purekd.runner import EarlyStopping, RunOptions


def test_split_takes_the_options_and_leaves_the_model_arguments() -> None:
    stopping = EarlyStopping(metric=lambda model, step: 0.0)
    options = RunOptions.split({"save_state": True, "keep_last_states": 2, "output_hidden": 1,
                                "early_stopping": stopping}, max_grad_norm=1.0, callback=None,
                               batch_postprocessor=None)
    assert options.save_state and options.keep_last_states == 2
    assert options.early_stopping is stopping and options.max_grad_norm == 1.0
    assert options.model_args == {"output_hidden": 1}
    assert options.describe() == {"max_grad_norm": 1.0, "early_stopping": {
        "patience": stopping.patience, "mode": stopping.mode, "keep_best": stopping.keep_best,
        "min_delta": stopping.min_delta}}


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"max_grad_norm": float("nan")}, ValueError, "max_grad_norm=nan: must be a number"),
    ({"max_grad_norm": True}, ValueError, "max_grad_norm=True: must be a number"),
    ({"callback": 3}, TypeError, "callback=3: must be a function"),
    ({"batch_postprocessor": {"a": 1}}, TypeError, "batch_postprocessor=1: must be a function"),
    ({"early_stopping": "loss"}, TypeError, "early_stopping must be a purekd.EarlyStopping"),
    ({"save_state": 1}, TypeError, "save_state=1: must be True or False"),
    ({"extend_run": "yes"}, TypeError, "extend_run='yes': must be True or False"),
    ({"overwrite_output_dir": "no"}, TypeError, "overwrite_output_dir='no': must be None"),
    ({"keep_last_states": 0, "save_state": True}, ValueError, "keep_last_states=0: must be None"),
    ({"resume_from": 3}, TypeError, "resume_from=3: must be a path"),
    ({"progress_bar": "on"}, TypeError, "progress_bar='on': must be None"),
    ({"metric_sinks": [object()]}, TypeError, r"metric_sinks\[0\]=.*: a sink needs"),
    ({"resume_from": "out", "overwrite_output_dir": True}, ValueError,
     "resume_from with overwrite_output_dir=True"),
    ({"extend_run": True}, ValueError, "extend_run=True without resume_from"),
])
def test_each_option_is_checked_once_with_its_message(options: dict[str, Any],
                                                      error: type[Exception],
                                                      message: str) -> None:
    with pytest.raises(error, match=message):
        RunOptions(**options)


def test_keep_last_states_without_save_state_warns() -> None:
    with pytest.warns(UserWarning, match="keep_last_states=2 without save_state=True"):
        RunOptions(keep_last_states=2)


def test_an_option_given_twice_is_refused() -> None:
    with pytest.raises(TypeError, match="train\\(\\) got batch_postprocessor= twice"):
        RunOptions.split({"batch_postprocessor": print}, batch_postprocessor={"a": print})


def test_the_record_is_frozen() -> None:
    import attrs

    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        RunOptions().save_state = True  # type: ignore[misc]
