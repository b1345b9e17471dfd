"""The options of one ``train()`` call, as one validated record.

TextBrewer's ``train`` takes ``max_grad_norm``, ``callback`` and ``batch_postprocessor``
positionally, and passes every other keyword to the models (``**args``). purekd's own options
(:class:`RunOptions`' other fields) are keywords of ``train`` too: :meth:`RunOptions.split`
takes them out of ``**args`` by name, once, and the record checks each of them once, when it is
built — before anything is loaded or trained. The runner reads the record, nothing else.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ._early_stopping import EarlyStopping
from ._sinks import MetricSink, check_sinks


def _max_grad_norm(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"max_grad_norm={value!r}: must be a number (> 0 clips the student's "
                         "gradient norm to it; <= 0 means no clipping)")


def _callback(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"callback={value!r}: must be a function callback(model=..., step=...)")


def _postprocessor(instance: Any, attribute: Any, value: Any) -> None:
    for post in value.values() if isinstance(value, Mapping) else [value]:
        if post is not None and not callable(post):
            raise TypeError(f"batch_postprocessor={post!r}: must be a function of the batch")


def _early_stopping(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and not isinstance(value, EarlyStopping):
        raise TypeError(f"early_stopping must be a purekd.EarlyStopping, got "
                        f"{type(value).__name__}")


def _flag(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{attribute.name}={value!r}: must be True or False")


def _overwrite(instance: Any, attribute: Any, value: Any) -> None:
    if value not in (None, True, False):
        raise TypeError(f"overwrite_output_dir={value!r}: must be None (warn), False (refuse) "
                        "or True (delete the earlier run's files)")


def _keep_last(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"keep_last_states={value!r}: must be None (keep every state) or an "
                         "int >= 1")


def _resume_from(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"resume_from={value!r}: must be a path (a state file or the output "
                        "directory) or None")


def _progress_bar(instance: Any, attribute: Any, value: Any) -> None:
    if value not in (None, True, False):
        raise TypeError(f"progress_bar={value!r}: must be None (on when stderr is a terminal), "
                        "True or False")


@attrs.frozen(kw_only=True)
class RunOptions:
    """What one ``train()`` call asks of the runner besides the optimizer, the data and the
    length; each field is checked when the record is built.

    ``max_grad_norm``: > 0 clips the student's gradient norm to it. ``callback(model=student,
    step=global_step)`` runs after each checkpoint. ``batch_postprocessor``: a function of the
    batch (a dict of them by task for :class:`~purekd.MultiTaskDistiller`). ``model_args``: more
    keywords for every model call (TextBrewer's ``**args``). ``resume_from``: a state file or
    the output directory to continue. ``save_state``: write the full state beside each
    checkpoint. ``early_stopping``: an :class:`~purekd.EarlyStopping`. ``keep_last_states=N``:
    keep only the run's last N state files. ``overwrite_output_dir``: what a fresh run does in a
    directory holding an earlier run's files (``None`` warns, ``False`` refuses, ``True``
    deletes them). ``progress_bar``: force the tqdm bar on or off. ``metric_sinks``: more
    :class:`~purekd.runner.MetricSink` objects. ``extend_run``: with ``resume_from``, continue
    the run for a longer plan (more ``num_steps`` or ``num_epochs``) than it was started with —
    see :func:`purekd.runner._state.check_fingerprint`.
    """

    max_grad_norm: float = attrs.field(default=-1.0, validator=_max_grad_norm)
    callback: Callable[..., Any] | None = attrs.field(default=None, validator=_callback)
    batch_postprocessor: Callable[[Any], Any] | Mapping[str, Callable[[Any], Any]] | None = (
        attrs.field(default=None, validator=_postprocessor))
    model_args: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    resume_from: str | os.PathLike[str] | None = attrs.field(default=None, validator=_resume_from)
    save_state: bool = attrs.field(default=False, validator=_flag)
    early_stopping: EarlyStopping | None = attrs.field(default=None, validator=_early_stopping)
    keep_last_states: int | None = attrs.field(default=None, validator=_keep_last)
    overwrite_output_dir: bool | None = attrs.field(default=None, validator=_overwrite)
    progress_bar: bool | None = attrs.field(default=None, validator=_progress_bar)
    metric_sinks: tuple[MetricSink, ...] = attrs.field(default=(), converter=check_sinks)
    extend_run: bool = attrs.field(default=False, validator=_flag)

    def __attrs_post_init__(self) -> None:
        if self.resume_from is not None and self.overwrite_output_dir is True:
            raise ValueError("resume_from with overwrite_output_dir=True: resuming continues the "
                             "run in the directory, overwriting would delete it; choose one")
        if self.extend_run and self.resume_from is None:
            raise ValueError("extend_run=True without resume_from: extending continues a saved "
                             "run; pass resume_from (its output directory or a state file)")
        if self.keep_last_states is not None and not self.save_state:
            warnings.warn(f"keep_last_states={self.keep_last_states!r} without save_state=True: "
                          "no state file is written, so there is nothing to keep", UserWarning,
                          stacklevel=5)

    @classmethod
    def split(cls, keywords: Mapping[str, Any], **given: Any) -> RunOptions:
        """The record from ``train``'s ``given`` options and its ``**args`` (``keywords``):
        the names of :class:`RunOptions`' fields are options, every other keyword a model
        argument (``model_args``)."""
        names = {field.name for field in attrs.fields(cls)} - {"model_args"}
        options = {name: value for name, value in keywords.items() if name in names}
        twice = sorted(set(options) & set(given))
        if twice:
            raise TypeError(f"train() got {twice[0]}= twice: this train() takes it under "
                            "another name or position (MultiTaskDistiller.train: "
                            "batch_postprocessors, a dict by task)")
        model_args = {name: value for name, value in keywords.items() if name not in names}
        return cls(**given, **options, model_args=model_args)

    def describe(self) -> dict[str, Any]:
        """The options that change the result, for the run's fingerprint."""
        stopping = self.early_stopping
        return {"max_grad_norm": self.max_grad_norm,
                "early_stopping": None if stopping is None else {
                    k: getattr(stopping, k) for k in ("patience", "mode", "keep_best", "min_delta")}}


__all__ = ["RunOptions"]
