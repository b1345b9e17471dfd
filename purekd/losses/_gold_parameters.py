"""GOLD's parameters as a ``kd_loss_type`` gives them (``['gold', {...}]``), checked without
logits: where the config (:mod:`purekd.presets`) and the term (:mod:`purekd.terms`) both
validate them, before any batch (:func:`~purekd.losses.aligned_gold` checks the same when
called)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import _divergences

GOLD_DEFAULTS: dict[str, Any] = {"loss": "jsd", "matched_weight": None,
                                  "unmatched_weight": None, "top_k": None, "tail": "total"}
"""GOLD's own parameters and their defaults (its divergence's parameters come on top).
``tail`` concerns a top-k teacher (a cross-tokenizer cache) only:
:func:`~purekd.losses.aligned_gold_topk`'s convention for the mass outside its top-k."""


TOPK_TAILS = ("total", "uniform")
"""GOLD's conventions for a top-k teacher's mass outside its top-k
(:func:`~purekd.losses.aligned_gold_topk`)."""


def check_tail(tail: Any, where: str) -> None:
    """``tail`` is one of :data:`TOPK_TAILS`, else a ``ValueError`` naming both."""
    if tail not in TOPK_TAILS:
        raise ValueError(f"{where}: tail={tail!r}; choose 'total' (a top-k teacher's matched head "
                         f"only, its tail in total in the ULD part) or 'uniform' (its rows "
                         f"completed to V_T with a uniform tail)")


def check_gold_parameters(params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """GOLD's parameters (:data:`GOLD_DEFAULTS` and those of its divergence ``loss``),
    validated: a ``ValueError`` starting with ``where`` names the bad one."""
    params = dict(params)
    loss = params.get("loss", GOLD_DEFAULTS["loss"])
    one_vocabulary = [n for n in _divergences.names() if n != "uld"]
    if not isinstance(loss, str) or loss not in one_vocabulary:
        raise ValueError(f"{where}: loss={loss!r} is the divergence on the matched tokens; "
                         f"choose one of {sorted(one_vocabulary)}")
    own = {k: v for k, v in params.items() if k not in GOLD_DEFAULTS}
    try:
        _divergences.parameters(loss, "", own)
    except (ValueError, TypeError) as error:
        reason = str(error).removeprefix(": ")
        raise ValueError(f"{where}: {reason}; 'gold' takes {sorted(GOLD_DEFAULTS)} and the "
                         f"parameters of its loss {loss!r}: "
                         f"{sorted(_divergences.declared(loss, where).defaults)}"
                         ) from None
    w_m, w_u = params.get("matched_weight"), params.get("unmatched_weight")
    if (w_m is None) != (w_u is None):
        raise ValueError(f"{where}: give both matched_weight and unmatched_weight (numbers >= "
                         f"0) or neither (TRL's matched share M / V_T and 1 - M / V_T)")
    for key, weight in (("matched_weight", w_m), ("unmatched_weight", w_u)):
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                                   or not 0 <= weight < float("inf")):
            raise ValueError(f"{where}: {key}={weight!r} must be a finite number >= 0")
    check_tail(params.get("tail", GOLD_DEFAULTS["tail"]), where)
    top_k = params.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{where}: top_k={top_k!r} must be a positive int, or None to sort the "
                         f"whole vocabulary")
    return params


__all__ = ["GOLD_DEFAULTS", "TOPK_TAILS", "check_gold_parameters", "check_tail"]
