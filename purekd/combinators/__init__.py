"""Layer 4 — combinators: build a step out of stages and terms.

* :func:`chain` — compose stages;
* :func:`objective`, :func:`weighted`, :func:`scheduled_after_start` — sum named terms, weight
  them by constants or schedules of progress;
* :func:`single_teacher`, :func:`mean_of_teachers`, :func:`models_stage` — run the models
  (cached teacher outputs from ``batch['teacher_cache']`` included);
* :class:`OnPolicyStage` — sample completions of prompts in front of the models stage;
* :func:`route_by_task` — one step per task;
* :func:`token_share`, :func:`token_normalised` — token-correct normalisation over micro-batches;
* :func:`compiled` — the loss path under ``torch.compile``, with an eager fallback;
* :class:`Step` — the assembled step; :func:`make_step` builds it from a config.

Imports: stages and terms (3), schedules (2), losses (1); :func:`make_step` alone also reads a
:class:`~purekd.DistillationConfig` and the :mod:`~purekd.presets` maps, facade data that
themselves import only layers 1–2 (never the runner or the distillers).
"""

from purekd._compiling import Compiled, compiled

from ._chain import chain
from ._from_config import CustomMatch, build_projections, make_step
from ._models import (
    Outputs,
    TeacherStage,
    capture_outputs,
    mean_of_teachers,
    models_stage,
    single_teacher,
)
from ._objective import (
    LossFn,
    Objective,
    StepOutput,
    evaluate_weight,
    objective,
    scheduled_after_start,
    weighted,
)
from ._on_policy import OnPolicyStage, on_policy_stage
from ._step import Step
from ._tasks import TaskRouter, route_by_task
from ._tokens import token_normalised, token_share

__all__ = [
    "Compiled",
    "CustomMatch",
    "LossFn",
    "Objective",
    "OnPolicyStage",
    "Outputs",
    "Step",
    "StepOutput",
    "TaskRouter",
    "TeacherStage",
    "build_projections",
    "capture_outputs",
    "chain",
    "compiled",
    "evaluate_weight",
    "make_step",
    "mean_of_teachers",
    "models_stage",
    "objective",
    "on_policy_stage",
    "route_by_task",
    "scheduled_after_start",
    "single_teacher",
    "token_normalised",
    "token_share",
    "weighted",
]
