"""purekd — knowledge distillation for PyTorch.

A core of pure functions (losses, schedules, stages, terms) composed by a small combinator
library into a step, a thin stateful runner on top, and a TextBrewer-compatible surface.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names, for type checkers; at run time they load on first use
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

# Lazy: ``import purekd`` imports no torch, so the command line (``purekd distill --help``, a
# recipe's validation) starts at once; the first use of a name below imports its module.
_SUBMODULES = ("combinators", "losses", "presets", "schedules", "stages", "terms", "utils")
_NAMES = {
    **dict.fromkeys(("CustomMatch", "Step", "StepOutput", "make_step"), "purekd.combinators"),
    **dict.fromkeys(("DistillationConfig", "FSDPConfig", "IntermediateMatch", "OnPolicyConfig",
                     "TrainingConfig"), "purekd.configs"),
    **dict.fromkeys(("BasicDistiller", "BasicTrainer", "GeneralDistiller", "MultiTaskDistiller",
                     "MultiTeacherDistiller"), "purekd.distillers"),
    **dict.fromkeys(("ADAPTOR_KEYS", "FEATURES", "KD_LOSS_MAP", "MATCH_LOSS_MAP", "PROJ_MAP",
                     "TEMPERATURE_SCHEDULER", "WEIGHT_SCHEDULER", "register_new"),
                    "purekd.presets"),
    **dict.fromkeys(("EarlyStopping", "NonFiniteLossError"), "purekd.runner"),
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value: Any = importlib.import_module(f"purekd.{name}")
    elif name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name == "Distillers":
        from purekd import distillers

        value = {"Basic": distillers.BasicDistiller, "General": distillers.GeneralDistiller,
                 "MultiTeacher": distillers.MultiTeacherDistiller,
                 "MultiTask": distillers.MultiTaskDistiller, "Train": distillers.BasicTrainer}
    elif importlib.util.find_spec(f"purekd.{name}") is not None:
        # any other module (purekd.runner, purekd.distillers, ...): ``import purekd`` made them
        # all attributes when it was eager, and code written then keeps working
        value = importlib.import_module(f"purekd.{name}")
    else:
        raise AttributeError(f"module 'purekd' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


Distillers: dict[str, type]
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
