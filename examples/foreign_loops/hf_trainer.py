"""purekd's step inside the Hugging Face ``Trainer``: override ``compute_loss``.

    python examples/foreign_loops/hf_trainer.py --steps 40

The Trainer's model is the step itself (an ``nn.Module``), so everything the Trainer does with
its model — ``model.train()``, device placement, DDP / FSDP wrapping, the default optimizer over
``model.parameters()``, saving ``state_dict()`` — covers the student *and* the projections,
while the teacher, held but not registered by the step, stays untouched (move it to the device
yourself). ``compute_loss`` returns the step's loss at ``progress = global_step / max_steps``.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
from torch import nn
from toy_setup import BATCH_SIZE, LR, STEPS, Result, build, evaluate, finish
from transformers import Trainer, TrainingArguments


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose model is a purekd step: the loss is the distillation loss."""

    # The step's loss is a per-batch mean: the Trainer must divide it by the number of
    # gradient-accumulation steps. The step's forward takes **kwargs, which the Trainer would
    # read as "the model normalises its loss by num_items_in_batch itself"; say it does not.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.train_losses: list[float] = []

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        del num_items_in_batch
        progress = self.state.global_step / max(self.state.max_steps, 1)
        out = model(inputs, progress=progress)  # `model` may be the step wrapped (DDP, ...)
        if model.training:
            self.train_losses.append(out.loss.item())
        return (out.loss, out) if return_outputs else out.loss


def main(steps: int = STEPS, batch_size: int = BATCH_SIZE, lr: float = LR, seed: int = 0,
         output_dir: str | None = None) -> Result:
    setup = build(seed)
    step, dataset = setup.step, setup.dataset
    loss_before = evaluate(step, dataset)
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="purekd-hf-trainer-"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        train_sampling_strategy="sequential",  # data-set order, as the plain loop
        lr_scheduler_type="constant",
        max_grad_norm=0.0,                     # no clipping
        use_cpu=True,
        seed=seed,
        save_strategy="no",
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    setup.teacher.to(args.device)  # the Trainer places its model (the step), not the teacher
    optimizer = torch.optim.SGD(step.parameters(), lr=lr)  # or leave it to the Trainer
    trainer = DistillationTrainer(model=step, args=args, train_dataset=dataset,
                                  optimizers=(optimizer, None))
    trainer.train()
    return finish(loss_before, step, dataset, trainer.train_losses)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    result = main(args.steps, args.batch_size, args.lr, output_dir=args.output_dir)
    print(f"loss before {result.loss_before:.4f}, after {result.loss_after:.4f}")
