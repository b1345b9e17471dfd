"""The torchrun worker of ``test_sampler_fsdp.py``: two CPU processes (gloo) sample from one
FSDP2-sharded Llama. Rank 0's completions end after one token (every id is a stop token),
rank 1's run to ``max_new_tokens``: with ``synced_gpus`` (on by default under
``torch.distributed``) rank 0 keeps stepping, so both ranks run the same number of forwards
and neither waits forever for the other's all-gathers.

``python -m torch.distributed.run --nproc-per-node 2 _sampler_fsdp_worker.py WORK [SAMPLER]``

``SAMPLER``: ``generate`` (``HFGenerateSampler``, the default) or ``kv_cache``
(``KVCacheSampler``, purekd's own decode loop).

Each rank writes ``WORK/rank<r>.pt``: its rollout from the sharded model, the rollout of an
unsharded copy of the same model on the same prompts and seed in this process, and the number
of forward calls the sharded model made.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from purekd.stages import HFGenerateSampler, KVCacheSampler, rollout
from tests._on_policy import VOCAB, tiny_llama

MAX_NEW_TOKENS = 6


def main(work: Path, kind: str = "generate") -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny_llama(2, 16, seed=0).eval()
    model.generation_config.eos_token_id = None  # stops come from the sampler alone
    reference = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    stops = tuple(range(VOCAB)) if rank == 0 else ()
    sampler = {"generate": HFGenerateSampler, "kv_cache": KVCacheSampler}[kind](
        max_new_tokens=MAX_NEW_TOKENS, stop_token_ids=stops, pad_token_id=0)
    prompts = torch.tensor([[0, 5, 6], [3, 4, 5]]) + rank
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    sharded = rollout(sampler, model, prompts, mask, seed=7)
    alone = rollout(sampler, reference, prompts, mask, seed=7)
    torch.save({"sharded": tuple(sharded), "alone": tuple(alone), "forwards": len(calls)},
               work / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
