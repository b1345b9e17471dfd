"""purekd's step in an Accelerate training loop.

    python examples/foreign_loops/accelerate_loop.py --steps 40
    accelerate launch examples/foreign_loops/accelerate_loop.py   # several processes

``accelerator.prepare`` takes the step like any model (on several processes it wraps it in DDP,
which then synchronises the student's and the projections' gradients); the teacher, held but not
registered by the step, is moved to the device by hand.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from toy_setup import BATCH_SIZE, LR, STEPS, Result, batches, build, evaluate, finish, loader


def main(steps: int = STEPS, batch_size: int = BATCH_SIZE, lr: float = LR, seed: int = 0,
         cpu: bool = True) -> Result:
    setup = build(seed)
    step, dataset = setup.step, setup.dataset
    loss_before = evaluate(step, dataset)
    accelerator = Accelerator(cpu=cpu)
    setup.teacher.to(accelerator.device)  # not part of the step's parameters
    optimizer = torch.optim.SGD(step.parameters(), lr=lr)  # student + projections
    prepared_step, optimizer, data = accelerator.prepare(step, optimizer, loader(dataset, batch_size))
    prepared_step.train()
    losses = []
    for index, batch in enumerate(batches(data, steps)):
        out = prepared_step(batch, progress=index / steps)
        accelerator.backward(out.loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return finish(loss_before, accelerator.unwrap_model(prepared_step), dataset, losses)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--device", choices=["cpu", "auto"], default="cpu",
                        help="'auto': the accelerator's device (GPU when there is one)")
    args = parser.parse_args()
    result = main(args.steps, args.batch_size, args.lr, cpu=args.device == "cpu")
    print(f"loss before {result.loss_before:.4f}, after {result.loss_after:.4f}")
