"""Layer 5 — the step over explicit parameters, for ``torch.func``.

* :func:`trainable_params`, :func:`functional_step`, :func:`loss_and_terms` — the step as a
  function of ``params`` (``functional_call``), for ``grad_and_value(..., has_aux=True)``;
* :class:`Ensemble`, :func:`ensemble_teachers` — same-architecture teachers in one ``vmap``.
"""

from ._call import (
    Params,
    functional_step,
    load_params,
    loss_and_terms,
    sgd_update,
    trainable_params,
)
from ._ensemble import Ensemble, ensemble_teachers

__all__ = [
    "Ensemble",
    "Params",
    "ensemble_teachers",
    "functional_step",
    "load_params",
    "loss_and_terms",
    "sgd_update",
    "trainable_params",
]
