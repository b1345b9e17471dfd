"""``compiled``: run a function under ``torch.compile``, falling back to eager.

Shared by the losses (the chunked KD kernels) and the combinators (the step's loss path)."""

from __future__ import annotations

import contextlib
import contextvars
import statistics
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch


def _inside_functorch_transform() -> bool:
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


AUTO = "auto"

_EAGER_BLOCKS: contextvars.ContextVar[bool] = contextvars.ContextVar("purekd_eager_blocks",
                                                                    default=False)
"""Set (for the extent of one call, then reset) by a :class:`Compiled` configured
``enabled=False``: the block kernels of the chunked and fused losses it calls run eagerly too."""


@contextlib.contextmanager
def eager_blocks() -> Iterator[None]:
    """While open (in this thread or task only), the losses' block kernels are not compiled:
    ``compile=False`` on a step reaches the fused and chunked losses inside its loss path.
    The previous setting is restored on exit, so nothing leaks into a later call or run."""
    token = _EAGER_BLOCKS.set(True)
    try:
        yield
    finally:
        _EAGER_BLOCKS.reset(token)


def blocks_may_compile() -> bool:
    """Whether a loss called now may compile its block kernels (not inside
    :func:`eager_blocks`)."""
    return not _EAGER_BLOCKS.get()

AUTO_WARMUP_CALLS = 1
"""Calls run eagerly and not measured before ``"auto"`` starts measuring (first-call costs)."""
AUTO_SAMPLES = 3
"""Measured eager calls ``"auto"`` decides from (the median)."""
AUTO_MIN_SHARE = 0.5
"""``"auto"`` compiles only when the loss path takes at least this share of the step's forward
time: where the models dominate, compiling the loss path saves little and its guards, copies and
compilation cost more (see docs/benchmarks.md)."""
AUTO_MIN_SECONDS = 0.005
"""... and only when the loss path's eager forward takes at least this long per call: a tiny loss
path gains nothing from fusion that could pay back the compilation."""


class Compiled:
    """A function compiled with ``torch.compile`` on first use, with a clean eager fallback.

    * ``enabled=True`` compiles on the first call; ``enabled=False`` runs eagerly (same
      results, no compilation), the block kernels of the chunked and fused losses it calls
      included (:func:`eager_blocks`, for the extent of each call);
    * ``enabled="auto"`` runs eagerly while the caller (a :class:`~purekd.Step`) measures a few
      calls with :meth:`observe`, then compiles only if the loss path is heavy: at least
      :data:`AUTO_MIN_SHARE` of the step's forward time and :data:`AUTO_MIN_SECONDS` per call.
      ``decision`` says what it chose and why;
    * if compilation fails (no C compiler, an unsupported construct in a user's loss), the call
      is retried eagerly; if that succeeds the function stays eager from then on and a single
      ``RuntimeWarning`` says why; if eager fails too, eager's exception is raised;
    * inside ``torch.func`` transforms (``grad``, ``vmap``) it runs eagerly;
    * attributes of the wrapped function (e.g. ``check``) stay reachable.
    """

    def __init__(self, fn: Callable[..., Any], *, enabled: bool | Literal["auto"] = True,
                 **options: Any):
        if enabled not in (True, False, AUTO):
            raise ValueError(f"compile={enabled!r}: use True, False or 'auto'")
        self.eager = fn
        self.enabled: bool | str = enabled
        self.options = options
        self._compiled: Callable[..., Any] | None = None
        self.fallback_reason: str | None = None
        self.decision: str | None = None
        self._configured = enabled
        self._samples: list[tuple[float, float]] = []
        self._skipped = 0

    @property
    def deciding(self) -> bool:
        """Whether ``"auto"`` still measures (the calls run eagerly meanwhile)."""
        return self.enabled == AUTO

    def observe(self, loss_seconds: float, step_seconds: float) -> None:
        """Record one eager call of ``"auto"``: the loss path's forward time and the whole step's
        forward time (models + loss path); after :data:`AUTO_SAMPLES` calls, decide."""
        if not self.deciding:
            return
        if self._skipped < AUTO_WARMUP_CALLS:
            self._skipped += 1
            return
        self._samples.append((loss_seconds, step_seconds))
        if len(self._samples) < AUTO_SAMPLES:
            return
        loss = statistics.median(s for s, _ in self._samples)
        share = statistics.median(s / t if t > 0 else 1.0 for s, t in self._samples)
        heavy = share >= AUTO_MIN_SHARE and loss >= AUTO_MIN_SECONDS
        self.enabled = heavy
        self.decision = (
            f"compile='auto': the loss path took {share:.0%} of the step's forward time "
            f"({loss * 1e3:.1f} ms per call); "
            + ("compiled" if heavy else "eager")
            + f" (compiles at >= {AUTO_MIN_SHARE:.0%} and >= {AUTO_MIN_SECONDS * 1e3:g} ms)")

    def like(self, fn: Callable[..., Any]) -> Compiled:
        """``fn`` wrapped the way this one was first configured (same ``enabled``, options)."""
        return Compiled(fn, enabled=self._configured, **self.options)

    def __getattr__(self, name: str) -> Any:
        if name == "eager":  # not yet set during unpickling
            raise AttributeError(name)
        return getattr(self.eager, name)

    @property
    def is_compiled(self) -> bool:
        return self.enabled is True and self.fallback_reason is None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._configured is False:  # compile=False all the way down, for this call only
            with eager_blocks():
                return self.eager(*args, **kwargs)
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


def compiled(fn: Callable[..., Any], *, enabled: bool | Literal["auto"] = True,
             **options: Any) -> Compiled:
    """Wrap ``fn`` in :class:`Compiled`; ``options`` go to ``torch.compile``; ``enabled`` is
    ``True``, ``False`` or ``"auto"`` (compile only a heavy loss path, decided by measuring)."""
    return Compiled(fn, enabled=enabled, **options)


__all__ = ["AUTO", "Compiled", "blocks_may_compile", "compiled", "eager_blocks"]
