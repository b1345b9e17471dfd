"""Layer 2 — schedules: pure functions of training progress or of the logits.

* weight schedules ``progress -> weight``: :func:`linear_decay`, :func:`linear_growth`,
  :func:`constant_weight`;
* temperature schedules ``(logits_S, logits_T, base_temperature, mask=None) -> temperature``:
  :func:`constant_temperature`, :func:`flsw`, :func:`cwsm`.
"""

from ._temperature import Temperature, TemperatureSchedule, cwsm, flsw
from ._temperature import constant as constant_temperature
from ._weight import WeightSchedule, linear_decay, linear_growth
from ._weight import constant as constant_weight

__all__ = [
    "Temperature",
    "TemperatureSchedule",
    "WeightSchedule",
    "constant_temperature",
    "constant_weight",
    "cwsm",
    "flsw",
    "linear_decay",
    "linear_growth",
]
