"""Metric sinks: where the losses of a run go.

A sink is any object with two methods (:class:`MetricSink`)::

    sink.log(step, metrics)   # step: int, the micro-batch index; metrics: {name: float}
    sink.close()              # at the end of train(); release files, finish the run

and, optionally, ``sink.flush()``, called after each batch of :meth:`log` calls (the runner
logs in batches: every ``log_every`` optimizer steps and at checkpoints).

What one record holds (one record per micro-batch, ``step`` counting micro-batches from 0 as
TextBrewer's TensorBoard scalars do):

=============== ===============================================================================
``loss``        the total loss of the micro-batch (what was back-propagated, before scaling for
                accumulation)
``<term>``      each unweighted term the step reports: ``kd_loss``, ``hard_label_loss``, each
                intermediate match (``hidden_hidden_mse_2_3``, ...)
``global_step`` the optimizer steps done before this micro-batch
``tokens``      the micro-batch's kept tokens (token-normalised steps only)
``lr``          the learning rate of the optimizer's first group for this micro-batch's
                optimizer step (``lr_1``, ``lr_2``, ... for the other groups, e.g. projections)
``grad_norm``   the L2 norm of the student's gradient (what max_grad_norm clips) at that step,
                after unscaling and before clipping; on the last micro-batch of the step only
=============== ===============================================================================

Four sinks ship with purekd: :class:`JsonlSink` (``output_dir/metrics.jsonl``, always on rank 0),
:class:`TensorBoardSink` (``TrainingConfig.log_dir``; TextBrewer's tags), :class:`WandbSink`
(``pip install purekd[tracking]``) and :class:`MlflowSink` (the same extra). Pass more with
``train(..., metric_sinks=[...])``; :func:`metric_sink` builds one by name (what a recipe's
``metrics:`` section maps onto).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class MetricSink(Protocol):
    """Receives the run's metrics: ``log(step, metrics)`` per record, ``close()`` at the end."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def check_sinks(sinks: Any) -> tuple[MetricSink, ...]:
    """``sinks`` as a tuple of sinks, or a ``TypeError`` naming the one without ``log`` and
    ``close``."""
    if sinks is None:
        return ()
    if isinstance(sinks, (str, bytes, Mapping)) or not hasattr(sinks, "__iter__"):
        raise TypeError(f"metric_sinks={sinks!r}: must be a list of sink objects (each with "
                        "log(step, metrics) and close()), e.g. [purekd.runner.WandbSink(...)]")
    found = tuple(sinks)
    for index, sink in enumerate(found):
        if not (callable(getattr(sink, "log", None)) and callable(getattr(sink, "close", None))):
            raise TypeError(f"metric_sinks[{index}]={sink!r}: a sink needs the methods "
                            "log(step, metrics) and close() (see purekd.runner.MetricSink)")
    return found


def drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a torn append), so the next append starts clean."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as file:
        file.seek(-1, os.SEEK_END)
        if file.read(1) == b"\n":
            return
        file.seek(0)
        data = file.read()
        cut = data.rfind(b"\n") + 1
        warnings.warn(f"{path}: dropped a torn last line ({len(data) - cut} bytes without a "
                      "newline)", RuntimeWarning, stacklevel=5)
        file.truncate(cut)



class JsonlSink:
    """One JSON line per record, ``{"step": step, **metrics}``, appended to ``path`` one whole
    batch of lines per write (at :meth:`flush`); a torn last line left by a crash is cut before
    the first append."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lines: list[str] = []
        self._appended = False

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._lines.append(json.dumps({"step": step, **metrics}))

    def flush(self) -> None:
        if not self._lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._appended:
            drop_torn_tail(self.path)
            self._appended = True
        with self.path.open("a", encoding="utf-8") as file:
            file.write("\n".join(self._lines) + "\n")  # one write of whole lines
            file.flush()
        self._lines.clear()

    def close(self) -> None:
        self.flush()


# TextBrewer's TensorBoard tags for the total loss and the learning rate; a term is
# "scalar/unweighted_<term>", anything else "scalar/<name>".
_TAGS = {"loss": "scalar/total_loss", "lr": "scalar/lr"}
NOT_TERMS = frozenset({"loss", "global_step", "tokens", "grad_norm"})


def is_term(name: str) -> bool:
    """Whether a record's ``name`` is one of the step's terms (not the loss, a counter, a
    learning rate or the gradient norm)."""
    return name not in NOT_TERMS and not (name == "lr" or (name.startswith("lr_")
                                                           and name[3:].isdigit()))


def tensorboard_tag(name: str) -> str:
    """The TensorBoard tag of a record's ``name`` (TextBrewer's tags)."""
    if name in _TAGS:
        return _TAGS[name]
    return f"scalar/unweighted_{name}" if is_term(name) else f"scalar/{name}"


class TensorBoardSink:
    """TensorBoard event files in ``log_dir`` (``torch.utils.tensorboard``), with TextBrewer's
    tags: ``scalar/total_loss``, ``scalar/unweighted_<term>``, ``scalar/lr``; the other
    entries as ``scalar/<name>`` (``scalar/grad_norm``, ``scalar/global_step``, ...)."""

    def __init__(self, log_dir: str | os.PathLike[str]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer: Any = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(tensorboard_tag(name), value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


class WandbSink:
    """Weights & Biases: ``run.log(metrics, step=step)``.

    ``WandbSink(run=None, **init)``: log into ``run`` (a ``wandb.Run`` you started, left open at
    :meth:`close`), or start one with ``wandb.init(**init)`` and finish it at :meth:`close`.
    ``WandbSink(project="kd", mode="offline", dir="wandb-runs")`` writes an offline run
    (``wandb sync`` uploads it later). Needs ``pip install purekd[tracking]``.
    """

    def __init__(self, run: Any = None, **init: Any):
        if run is None:
            try:
                import wandb
            except ImportError as error:
                raise ImportError("WandbSink needs the wandb package: pip install "
                                  "'purekd[tracking]' (or pip install wandb)") from error
            init.setdefault("settings", wandb.Settings(console="off", x_disable_stats=True))
            run = wandb.init(**init)
            self._owned = True
        else:
            if init:
                raise TypeError(f"WandbSink(run=..., {', '.join(init)}=...): the options are "
                                "wandb.init's; with a run given, start it with them yourself")
            self._owned = False
        self.run: Any = run

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        if self.run is not None and self._owned:
            self.run.finish()
        self.run = None


class MlflowSink:
    """MLflow: every record as metrics at ``step`` of one MLflow run (``MlflowClient.log_batch``).

    ``MlflowSink(tracking_uri=None, experiment="purekd", run_id=None, run_name=None)``: log into
    the run ``run_id`` (left open at :meth:`close`) or a new run of ``experiment`` (created if
    absent), terminated at :meth:`close`. ``tracking_uri``: e.g. ``"file:///abs/mlruns"`` (MLflow
    3 needs ``MLFLOW_ALLOW_FILE_STORE=true`` for a ``file:`` store), ``"sqlite:///mlflow.db"``,
    or a server's URL; ``None``: MLflow's default (``MLFLOW_TRACKING_URI``). Needs
    ``pip install purekd[tracking]``. Non-finite values are logged as MLflow stores them (NaN).
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "purekd", *,
                 run_id: str | None = None, run_name: str | None = None):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as error:
            raise ImportError("MlflowSink needs the mlflow package: pip install "
                              "'purekd[tracking]' (or pip install mlflow-skinny)") from error
        self.client: Any = MlflowClient(tracking_uri=tracking_uri)
        self._owned = run_id is None
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (found.experiment_id if found is not None
                             else self.client.create_experiment(experiment))
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.run_id: str = run_id
        self._closed = False

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(name, float(value), stamp, step)
                                                    for name, value in metrics.items()])

    def close(self) -> None:
        if self._owned and not self._closed:
            self.client.set_terminated(self.run_id)
        self._closed = True


_BY_NAME: dict[str, Any] = {"jsonl": JsonlSink, "tensorboard": TensorBoardSink,
                            "wandb": WandbSink, "mlflow": MlflowSink}


def metric_sink(name: str, **options: Any) -> MetricSink:
    """The sink called ``name`` ("jsonl", "tensorboard", "wandb", "mlflow") built from
    ``options`` (its constructor's keywords): ``metric_sink("wandb", project="kd",
    mode="offline")``. What a recipe's ``metrics:`` section maps onto."""
    if name not in _BY_NAME:
        raise ValueError(f"metric sink {name!r}: unknown; the sinks are {sorted(_BY_NAME)} (or "
                         "pass your own object with log(step, metrics) and close())")
    try:
        sink: MetricSink = _BY_NAME[name](**options)
        return sink
    except TypeError as error:
        raise TypeError(f"metric sink {name!r}: {error}") from None


__all__ = [
    "JsonlSink",
    "MetricSink",
    "MlflowSink",
    "TensorBoardSink",
    "WandbSink",
    "check_sinks",
    "drop_torn_tail",
    "is_term",
    "metric_sink",
    "tensorboard_tag",
]
