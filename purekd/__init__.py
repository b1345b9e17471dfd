"""purekd — knowledge distillation for PyTorch.

A core of pure functions (losses, schedules, stages, terms) composed by a small combinator
library into a step, a thin stateful runner on top, and a TextBrewer-compatible surface.
"""

from purekd import combinators, losses, presets, schedules, stages, terms, utils
from purekd.combinators import CustomMatch, Step, StepOutput, make_step
from purekd.configs import (
    DistillationConfig,
    FSDPConfig,
    IntermediateMatch,
    OnPolicyConfig,
    TrainingConfig,
)
from purekd.distillers import (
    BasicDistiller,
    BasicTrainer,
    GeneralDistiller,
    MultiTaskDistiller,
    MultiTeacherDistiller,
)
from purekd.presets import (
    ADAPTOR_KEYS,
    FEATURES,
    KD_LOSS_MAP,
    MATCH_LOSS_MAP,
    PROJ_MAP,
    TEMPERATURE_SCHEDULER,
    WEIGHT_SCHEDULER,
    register_new,
)
from purekd.runner import EarlyStopping, NonFiniteLossError

Distillers = {
    "Basic": BasicDistiller,
    "General": GeneralDistiller,
    "MultiTeacher": MultiTeacherDistiller,
    "MultiTask": MultiTaskDistiller,
    "Train": BasicTrainer,
}
"""TextBrewer's table of distiller classes by short name."""

__version__ = "0.1.0"

__all__ = [
    "ADAPTOR_KEYS",
    "FEATURES",
    "KD_LOSS_MAP",
    "MATCH_LOSS_MAP",
    "PROJ_MAP",
    "TEMPERATURE_SCHEDULER",
    "WEIGHT_SCHEDULER",
    "BasicDistiller",
    "BasicTrainer",
    "CustomMatch",
    "DistillationConfig",
    "Distillers",
    "EarlyStopping",
    "FSDPConfig",
    "GeneralDistiller",
    "IntermediateMatch",
    "MultiTaskDistiller",
    "MultiTeacherDistiller",
    "NonFiniteLossError",
    "OnPolicyConfig",
    "Step",
    "StepOutput",
    "TrainingConfig",
    "__version__",
    "combinators",
    "losses",
    "make_step",
    "presets",
    "register_new",
    "schedules",
    "stages",
    "terms",
    "utils",
]
