"""How long training runs and when it checkpoints — TextBrewer's schedule, as pure functions."""

from __future__ import annotations

from typing import NamedTuple


class EpochPlan(NamedTuple):
    """Epoch-based training: ``steps_per_epoch = len(dataloader) // accumulation`` optimizer
    steps per epoch; checkpoints ``ckpt_frequency`` times per epoch, every
    ``ckpt_epoch_frequency`` epochs and always in the last epoch."""

    steps_per_epoch: int
    num_epochs: int
    ckpt_frequency: int
    ckpt_epoch_frequency: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.num_epochs

    @property
    def checkpoint_residues(self) -> list[int]:
        """``global_step % steps_per_epoch`` values at which a checkpoint is written."""
        return [int(self.steps_per_epoch * i / self.ckpt_frequency) for i in range(self.ckpt_frequency)]

    def is_checkpoint(self, global_step: int, epoch: int) -> bool:
        """Whether to save after optimizer step ``global_step`` (1-based) in ``epoch`` (0-based)."""
        if self.steps_per_epoch == 0:
            return False
        in_schedule = global_step % self.steps_per_epoch in self.checkpoint_residues
        right_epoch = (epoch + 1) % self.ckpt_epoch_frequency == 0 or epoch + 1 == self.num_epochs
        return in_schedule and right_epoch


class StepPlan(NamedTuple):
    """Step-based training: ``num_steps`` optimizer steps, a checkpoint every ``ckpt_steps``
    steps and at the last step (only at the last when ``ckpt_steps`` is ``None``)."""

    num_steps: int
    ckpt_steps: int | None

    @property
    def total_steps(self) -> int:
        return self.num_steps

    def is_checkpoint(self, global_step: int, epoch: int = 0) -> bool:
        del epoch
        periodic = self.ckpt_steps is not None and global_step % self.ckpt_steps == 0
        return periodic or global_step == self.num_steps


def progress(global_step: int, total_steps: int) -> float:
    """Fraction of training done after ``global_step`` optimizer steps."""
    return global_step / total_steps if total_steps > 0 else 0.0


__all__ = ["EpochPlan", "StepPlan", "progress"]
