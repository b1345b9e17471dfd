"""Layer 6 — the runner, the only stateful layer: epochs or step counts, accumulation,
clipping, LR scheduler, mixed precision, atomic checkpoints and exact resume, callbacks,
logging to metric sinks (JSONL, TensorBoard, Weights & Biases, MLflow, your own), progress
bars, teacher-logit caching; one process, DistributedDataParallel or FSDP2 sharding as
placements of one interface; states that name their run and are verified, validated and fallen
back from on resume.

Imports from the layers above: the stages (3, ``Adapted``), the training config's own module
(``purekd.configs._training``: data, no losses or presets) and three leaf modules
(``purekd._atomic``, ``purekd._collectives``, ``purekd._devices``); never the losses, the distillation config or the
distillers. The step it drives is any callable returning ``.loss`` and ``.terms``."""

from purekd._devices import move_to_device

from ._checkpoint import atomic_save, latest_state, state_path, weights_path
from ._distributed import local_rank_from
from ._early_stopping import EarlyStopping, EarlyStoppingState
from ._fsdp import block_modules, full_state_dict, local_numel
from ._guard import AllRanksNonFiniteGuard, NonFiniteGuard, NonFiniteLossError
from ._loop import Counters, Runner
from ._metrics import MetricsLogger
from ._options import RunOptions
from ._placement import (
    Distributed,
    OneProcess,
    Placement,
    Sharded,
    join_process_group,
    placement_for,
)
from ._plan import EpochPlan, StepPlan, progress
from ._precision import Precision
from ._rng import rng_state, set_rng_state
from ._sinks import JsonlSink, MetricSink, MlflowSink, TensorBoardSink, WandbSink, metric_sink
from ._sources import (
    Micro,
    PassLog,
    cached_epochs,
    cycled,
    epochs,
    sampled_tasks,
    task_sampling_weights,
)
from ._state import StateError

__all__ = [
    "AllRanksNonFiniteGuard",
    "Counters",
    "Distributed",
    "EarlyStopping",
    "EarlyStoppingState",
    "EpochPlan",
    "JsonlSink",
    "MetricSink",
    "MetricsLogger",
    "Micro",
    "MlflowSink",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "OneProcess",
    "PassLog",
    "Placement",
    "Precision",
    "RunOptions",
    "Runner",
    "Sharded",
    "StateError",
    "StepPlan",
    "TensorBoardSink",
    "WandbSink",
    "atomic_save",
    "block_modules",
    "cached_epochs",
    "cycled",
    "epochs",
    "full_state_dict",
    "join_process_group",
    "latest_state",
    "local_numel",
    "local_rank_from",
    "metric_sink",
    "move_to_device",
    "placement_for",
    "progress",
    "rng_state",
    "sampled_tasks",
    "set_rng_state",
    "state_path",
    "task_sampling_weights",
    "weights_path",
]
