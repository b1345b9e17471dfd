"""A recipe run's progress bar and summary.

The bar (tqdm, rank 0) advances at every optimizer step and shows the tokens per second and
the last micro-batch's loss and terms; it listens to the run without changing it: a forward
hook on the step reads each micro-batch's tokens (the student batch's attention mask) and its
``StepOutput``, a step hook on the optimizer counts the steps. The counts stay on the device;
they are copied to the host at most once a second, for the bar (no synchronisation per step).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn


def _student_batch(batch: Any) -> Any:
    if isinstance(batch, Mapping) and "student" in batch:
        return batch["student"]
    return batch


class Progress:
    """Counts trained tokens and steps of a run; draws the bar when ``enabled``."""

    def __init__(self, total_steps: int | None, *, enabled: bool | None, world_size: int = 1,
                 rank: int = 0):
        self.total = total_steps
        self.world = world_size
        self.enabled = (sys.stderr.isatty() if enabled is None else enabled) and rank == 0
        self._tokens: Any = 0  # a device tensor once counting starts
        self.steps = 0
        self._shown = 0.0
        self.start = time.perf_counter()
        self.last: dict[str, Tensor] = {}
        self.bar: Any = None
        self._handles: list[Any] = []

    def attach(self, step: nn.Module, optimizer: Any = None) -> None:
        self.start = time.perf_counter()
        self._handles.append(step.register_forward_hook(self._micro))
        if optimizer is not None:
            self.attach_optimizer(optimizer)
        if self.enabled and self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="distilling", unit="step",
                            dynamic_ncols=True)

    def attach_optimizer(self, optimizer: Any) -> None:
        self._handles.append(optimizer.register_step_post_hook(self._step))

    def _micro(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        batch = _student_batch(args[0]) if args else None
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        counted = getattr(output, "tokens", None)
        if isinstance(batch, Mapping) and "prompts" in batch and isinstance(counted, Tensor):
            # on-policy: the tokens the loss read (the sampled ones, on a sampled batch)
            self._tokens = self._tokens + counted.detach().sum() * self.world
        elif isinstance(mask, Tensor):
            self._tokens = self._tokens + mask.detach().sum() * self.world
        elif isinstance(ids, Tensor):
            self._tokens = self._tokens + ids.numel() * self.world
        terms = getattr(output, "terms", None)
        loss = getattr(output, "loss", None)
        self.last = {**({"loss": loss} if isinstance(loss, Tensor) else {}),
                     **(dict(terms) if isinstance(terms, Mapping) else {})}

    @property
    def tokens(self) -> int:
        """Tokens of the student batches so far (all ranks)."""
        return int(self._tokens)

    def _step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.steps += 1
        if self.bar is None:
            return
        now = time.perf_counter()
        if now - self._shown < 1.0 and self.steps != self.total:
            self.bar.update(1)
            return
        self._shown = now
        seconds = max(now - self.start, 1e-9)
        postfix = {"tok/s": f"{self.tokens / seconds:,.0f}"}
        for name, value in self.last.items():
            number = float(value.detach().float().mean())
            postfix[name] = f"{number:.4g}" if math.isfinite(number) else str(number)
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Summary(NamedTuple):
    """What a recipe run did: optimizer steps (the run's global step at the end), tokens trained
    on in this process's run (all ranks), wall time, the student's directory, and the held-out
    perplexity (``None`` without held-out data)."""

    steps: int
    tokens: int
    seconds: float
    student_dir: str | None
    output_dir: str
    perplexity: float | None
    perplexity_before: float | None

    def text(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else float("nan")
        lines = [f"steps        {self.steps}",
                 f"tokens       {self.tokens:,} ({rate:,.0f} tokens/s)",
                 f"time         {self.seconds:.1f} s",
                 f"output       {self.output_dir}"]
        if self.student_dir is not None:
            lines.append(f"student      {self.student_dir} (AutoModelForCausalLM.from_pretrained)")
        if self.perplexity is not None:
            before = (f" (before training {self.perplexity_before:,.1f})"
                      if self.perplexity_before is not None else "")
            lines.append(f"held-out ppl {self.perplexity:,.2f}{before}")
        return "\n".join(lines)


__all__ = ["Progress", "Summary"]
