"""purekd's step inside a Lightning ``LightningModule.training_step``.

    python examples/foreign_loops/lightning_module.py --steps 40

The module holds the step as a submodule, so Lightning's device placement, ``train()`` /
``eval()`` switching, checkpoints and strategies cover the student and the projections; the
teacher, held but not registered by the step, stays as it is (move it to the device yourself).
``training_step`` returns the step's loss at ``progress = global_step / max_steps``.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from toy_setup import BATCH_SIZE, LR, STEPS, Result, build, evaluate, finish, loader

import purekd


class DistillationModule(pl.LightningModule):
    """Trains ``distill_step`` (student + projections) with SGD."""

    def __init__(self, distill_step: purekd.Step, lr: float):
        super().__init__()
        self.distill_step = distill_step
        self.lr = lr
        self.train_losses: list[float] = []

    def on_fit_start(self) -> None:
        # Lightning places this module (student, projections); the teacher is not part of it.
        for teacher in self.distill_step.teachers.values():
            teacher.to(self.device)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        del batch_idx
        progress = self.global_step / max(self.trainer.max_steps, 1)
        out = self.distill_step(batch, progress=progress)
        self.log_dict({"loss": out.loss, **out.terms}, prog_bar=False)
        self.train_losses.append(out.loss.item())
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.distill_step.parameters(), lr=self.lr)


def main(steps: int = STEPS, batch_size: int = BATCH_SIZE, lr: float = LR, seed: int = 0) -> Result:
    setup = build(seed)
    step, dataset = setup.step, setup.dataset
    loss_before = evaluate(step, dataset)
    module = DistillationModule(step, lr)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps,
                         enable_checkpointing=False, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings():  # a toy in-memory data set needs no worker processes
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, train_dataloaders=loader(dataset, batch_size))
    return finish(loss_before, step, dataset, module.train_losses)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=LR)
    args = parser.parse_args()
    result = main(args.steps, args.batch_size, args.lr)
    print(f"loss before {result.loss_before:.4f}, after {result.loss_after:.4f}")
