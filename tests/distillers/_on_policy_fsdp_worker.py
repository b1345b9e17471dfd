"""The torchrun worker of ``test_on_policy_fsdp.py``: two CPU processes (gloo) distil a Llama
teacher into a Llama student on-policy with FSDP2 (both sharded), rank 0 on one prompt per
step and rank 1 on three (so the token-count normalisation over both ranks matters); the test compares the weights with one process on all four prompts.

``python -m torch.distributed.run --nproc-per-node 2 _on_policy_fsdp_worker.py WORK``

Sampling is with ``top_k=1`` (the most likely token: the rollouts do not depend on how the
random draws are split between processes), the models in float64 (no argmax can flip between
a sharded and an unsharded forward). Rank 0 writes ``WORK/weights.pt``: the gathered student.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

import purekd
from purekd.integrations import hf_adaptor
from tests._on_policy import PAD, tiny_llama

STEPS, WORLD, MAX_NEW_TOKENS = 3, 2, 4
SPLIT = (1, 3)  # prompts per step on rank 0 and rank 1: unequal token counts
PROMPTS = [[5, 6, 7], [3], [9, 10], [11, 12, 13, 14], [4, 8], [15], [16, 17, 18], [19, 20]]


def batches(rank: int | None) -> list[dict[str, torch.Tensor]]:
    """Per step, the prompts of ``rank`` (``None``: of every rank), left-padded."""
    out = []
    per_step = sum(SPLIT)
    for step in range(STEPS):
        rows = [PROMPTS[(step * per_step + i) % len(PROMPTS)] for i in range(per_step)]
        if rank is not None:
            start = sum(SPLIT[:rank])
            rows = rows[start:start + SPLIT[rank]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out.append({"prompts": ids, "prompt_attention_mask": mask})
    return out


def distil(config: purekd.TrainingConfig, data: list[Any]) -> Any:
    teacher, student = tiny_llama(2, 16, seed=0).eval(), tiny_llama(1, 8, seed=1)
    for model in (teacher, student):
        model.generation_config.eos_token_id = None  # every completion MAX_NEW_TOKENS long
    distill = purekd.DistillationConfig(
        kd_loss_type="reverse_kl", temperature=1,
        on_policy=purekd.OnPolicyConfig(max_new_tokens=MAX_NEW_TOKENS, top_k=1, seed=3))
    distiller = purekd.GeneralDistiller(config, distill, teacher, student,
                                        hf_adaptor(causal=True), hf_adaptor(causal=True),
                                        compile=False)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.5), data, num_steps=STEPS)
    return distiller


def main(work: Path) -> None:
    import torch.distributed as dist

    from purekd.runner import _fsdp

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = purekd.TrainingConfig(device="cpu", output_dir=str(work / "out"), fsdp=True,
                                   ckpt_steps=STEPS)
    distiller = distil(config, batches(rank))
    weights = _fsdp.full_state_dict(distiller.step)
    if rank == 0:
        torch.save(weights, work / "weights.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
