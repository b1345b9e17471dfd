"""Layer 6 — the runner, the only stateful layer: epochs or step counts, accumulation,
clipping, LR scheduler, mixed precision, atomic checkpoints and exact resume, callbacks,
logging, progress bars, teacher-logit caching, DistributedDataParallel and FSDP2 sharding;
states that name their run and are verified, validated and fallen back from on resume."""

from ._checkpoint import atomic_save, latest_state, state_path, weights_path
from ._distributed import join_launched, local_rank_from
from ._early_stopping import EarlyStopping, EarlyStoppingState
from ._fsdp import block_modules, full_state_dict, local_numel
from ._guard import AllRanksNonFiniteGuard, NonFiniteGuard, NonFiniteLossError
from ._loop import Counters, Runner, move_to_device
from ._metrics import MetricsLogger
from ._plan import EpochPlan, StepPlan, progress
from ._precision import Precision
from ._rng import rng_state, set_rng_state
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
    "EarlyStopping",
    "EarlyStoppingState",
    "EpochPlan",
    "MetricsLogger",
    "Micro",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "PassLog",
    "Precision",
    "Runner",
    "StateError",
    "StepPlan",
    "atomic_save",
    "block_modules",
    "cached_epochs",
    "cycled",
    "epochs",
    "full_state_dict",
    "join_launched",
    "latest_state",
    "local_numel",
    "local_rank_from",
    "move_to_device",
    "progress",
    "rng_state",
    "sampled_tasks",
    "set_rng_state",
    "state_path",
    "task_sampling_weights",
    "weights_path",
]
