"""purekd — knowledge distillation for PyTorch.

A core of pure functions (losses, schedules, stages, terms) composed by a small combinator
library into a step, a thin stateful runner on top, and a TextBrewer-compatible surface.
"""

from purekd import combinators, losses, presets, schedules, stages, terms
from purekd.combinators import CustomMatch, Step, StepOutput, make_step
from purekd.configs import DistillationConfig, IntermediateMatch, TrainingConfig
from purekd.distillers import (
    BasicDistiller,
    BasicTrainer,
    GeneralDistiller,
    MultiTaskDistiller,
    MultiTeacherDistiller,
)
from purekd.runner import EarlyStopping, NonFiniteLossError

__version__ = "0.1.0"

__all__ = [
    "BasicDistiller",
    "BasicTrainer",
    "CustomMatch",
    "DistillationConfig",
    "EarlyStopping",
    "GeneralDistiller",
    "IntermediateMatch",
    "MultiTaskDistiller",
    "MultiTeacherDistiller",
    "NonFiniteLossError",
    "Step",
    "StepOutput",
    "TrainingConfig",
    "__version__",
    "combinators",
    "losses",
    "make_step",
    "presets",
    "schedules",
    "stages",
    "terms",
]
