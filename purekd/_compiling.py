"""``compiled``: run a function under ``torch.compile``, falling back to eager.

Shared by the losses (the chunked KD kernels) and the combinators (the step's loss path)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch


def _inside_functorch_transform() -> bool:
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


class Compiled:
    """A function compiled with ``torch.compile`` on first use, with a clean eager fallback.

    * ``enabled=False`` runs eagerly (same results, no compilation);
    * if compilation fails (no C compiler, an unsupported construct in a user's loss), the call
      is retried eagerly; if that succeeds the function stays eager from then on and a single
      ``RuntimeWarning`` says why; if eager fails too, eager's exception is raised;
    * inside ``torch.func`` transforms (``grad``, ``vmap``) it runs eagerly;
    * attributes of the wrapped function (e.g. ``check``) stay reachable.
    """

    def __init__(self, fn: Callable[..., Any], *, enabled: bool = True, **options: Any):
        self.eager = fn
        self.enabled = enabled
        self.options = options
        self._compiled: Callable[..., Any] | None = None
        self.fallback_reason: str | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "eager":  # not yet set during unpickling
            raise AttributeError(name)
        return getattr(self.eager, name)

    @property
    def is_compiled(self) -> bool:
        return self.enabled and self.fallback_reason is None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.is_compiled or _inside_functorch_transform():
            return self.eager(*args, **kwargs)
        if self._compiled is None:
            self._compiled = torch.compile(self.eager, **self.options)
        try:
            return self._compiled(*args, **kwargs)
        except Exception as error:
            result = self.eager(*args, **kwargs)  # a genuine error raises here, uncompiled
            self.fallback_reason = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"torch.compile failed on {getattr(self.eager, '__qualname__', 'a function')}; "
                f"running it eagerly from now on "
                f"({self.fallback_reason.splitlines()[0][:300]})",
                RuntimeWarning,
                stacklevel=2,
            )
            return result


def compiled(fn: Callable[..., Any], *, enabled: bool = True, **options: Any) -> Compiled:
    """Wrap ``fn`` in :class:`Compiled`; ``options`` go to ``torch.compile``."""
    return Compiled(fn, enabled=enabled, **options)


__all__ = ["Compiled", "compiled"]
