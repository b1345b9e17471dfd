"""purekd's step in a plain PyTorch training loop.

    python examples/foreign_loops/plain_pytorch.py --steps 40

The step is an ``nn.Module``: ``step(batch, progress=p)`` returns ``StepOutput(loss, terms)``,
and ``step.parameters()`` are the student's and the projections' — what the optimizer updates.
"""

from __future__ import annotations

import argparse

import torch
from toy_setup import BATCH_SIZE, LR, STEPS, Result, batches, build, evaluate, finish, loader


def main(steps: int = STEPS, batch_size: int = BATCH_SIZE, lr: float = LR, seed: int = 0) -> Result:
    setup = build(seed)
    step, dataset = setup.step, setup.dataset
    optimizer = torch.optim.SGD(step.parameters(), lr=lr)  # student + projections
    loss_before = evaluate(step, dataset)
    losses = []
    step.train()  # the student (and projections) in training mode; the teacher stays in eval
    for index, batch in enumerate(batches(loader(dataset, batch_size), steps)):
        out = step(batch, progress=index / steps)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return finish(loss_before, step, dataset, losses)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=LR)
    args = parser.parse_args()
    result = main(args.steps, args.batch_size, args.lr)
    print(f"loss before {result.loss_before:.4f}, after {result.loss_after:.4f}")
