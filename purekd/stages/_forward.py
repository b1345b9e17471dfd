"""``forward``: call a model on a batch by the forward conventions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def forward(model: Callable[..., Any], batch: Any, **args: Any) -> Any:
    """Call ``model`` on ``batch``: a mapping as ``model(**batch, **args)``, a tuple or list as
    ``model(*batch, **args)``.

    Extra keyword ``args`` (TextBrewer's ``**args`` of ``train``) go to every call.
    """
    if isinstance(batch, Mapping):
        return model(**batch, **args)
    if isinstance(batch, (tuple, list)):
        return model(*batch, **args)
    raise TypeError(
        f"a batch must be a dict (called as model(**batch)) or a tuple/list (called as "
        f"model(*batch)), got {type(batch).__name__}; wrap a single tensor as (tensor,)"
    )


__all__ = ["forward"]
