"""The torchrun worker of ``test_hf_trainer_on_policy.py``'s DDP test: two CPU processes (gloo)
run the ``DistillationTrainer`` on an on-policy step with ``token_level=True``, each process on
two of the four prompts (greedy sampling, float64 models), for one optimizer step.

``python -m torch.distributed.run --nproc-per-node 2 _hf_trainer_on_policy_ddp_worker.py WORK``

Rank 0 writes ``WORK/weights.pt`` (the student after the step), ``WORK/lengths.pt`` (its
micro-batch's completion lengths, and rank 1's) and ``WORK/loss.pt`` (the logged loss).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(work: Path) -> None:
    from tests.integrations.test_hf_trainer_on_policy import greedy_run

    weights, trainer, lengths = greedy_run(work / "out", 2, 1, True)
    gathered: list[list[list[int]]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, lengths)
    if dist.get_rank() == 0:
        torch.save(weights, work / "weights.pt")
        torch.save(gathered, work / "lengths.pt")
        torch.save([log["loss"] for log in trainer.state.log_history if "loss" in log],
                   work / "loss.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
