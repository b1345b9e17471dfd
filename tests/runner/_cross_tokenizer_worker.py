"""The torchrun worker of ``test_cross_tokenizer_distributed.py``: two CPU processes (gloo) train a
student across tokenizers (``kd_loss_type`` ``"uld"`` / ``"gold"``, from the live teacher or from
a cross-tokenizer top-k cache) under DistributedDataParallel and under FSDP2, every run in one
launch.

``python -m torch.distributed.run --nproc-per-node 2 _cross_tokenizer_worker.py WORK``

``WORK/plan.pt`` (written by the test) holds, per run, each rank's micro-batches (collated in
the test process: this worker needs no tokenizer) and the vocabulary map. Each run leaves
``WORK/<run>.pt`` on rank 0: the student's gathered final weights. The models are defined here,
shared with the one-process reference in the test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

import purekd
from purekd.integrations import hf_adaptor

WORLD, ACCUMULATION, STEPS, LR, WIDTH = 2, 2, 2, 0.5, 8


class Output(NamedTuple):
    logits: Tensor


class CausalLM(torch.nn.Module):
    """ids ``(B, L)`` -> logits ``(B, L, V)``: position t depends on tokens 0..t only (a
    running mean of embeddings), so right padding changes no real row; float64 unless told."""

    def __init__(self, vocab: int, seed: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, WIDTH)
        self.out = torch.nn.Linear(WIDTH, vocab)
        self.to(dtype)

    def forward(self, input_ids: Tensor, **_: Any) -> Output:
        h = self.embed(input_ids).cumsum(1)
        h = h / torch.arange(1, input_ids.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return Output(self.out(torch.tanh(h)) * 3)


def models(vocab_T: int, vocab_S: int) -> tuple[CausalLM, CausalLM]:
    return CausalLM(vocab_T, seed=0), CausalLM(vocab_S, seed=1)


def training_config(placement: str, source: str, out: Path, *, world: int, bf16: bool = False
                    ) -> purekd.TrainingConfig:
    fsdp = None
    if placement == "fsdp":
        fsdp = purekd.FSDPConfig(blocks=("Linear",),
                                 teacher="none" if source == "cache" else "shard")
    return purekd.TrainingConfig(device="cpu", output_dir=str(out), fsdp=fsdp, bf16=bf16,
                                 gradient_accumulation_steps=ACCUMULATION if world > 1 else 1)


def train(run: dict[str, Any], batches: list[Any], out: Path, *, world: int) -> dict[str, Any]:
    """One run: ``STEPS`` optimizer steps of SGD over ``batches`` (this process's micro-batches,
    in order); the student's final weights (gathered on rank 0 under FSDP2)."""
    teacher, student = models(run["vocab_T"], run["vocab_S"])
    options = {"vocabulary_map": run["vocabulary_map"]} if run["loss"] == "gold" else {}
    adaptor = hf_adaptor(causal=True)
    distiller = purekd.GeneralDistiller(
        training_config(run["placement"], run["source"], out, world=world,
                        bf16=run.get("bf16", False)),
        purekd.DistillationConfig(kd_loss_type=[run["loss"], run["params"]], temperature=1.0),
        None if run["source"] == "cache" else teacher, student, adaptor, adaptor,
        compile=False, **options)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=LR), batches, num_steps=STEPS)
    if run["placement"] == "fsdp":
        from purekd.runner import full_state_dict

        return full_state_dict(student)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def main(work: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    plan = torch.load(work / "plan.pt", weights_only=False)
    for name, run in plan.items():
        weights = train(run, run["batches"][rank], work / name, world=WORLD)
        if rank == 0:
            torch.save(weights, work / f"{name}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    import torch.distributed as dist

    if dist.is_initialized():  # a gloo group left open at exit can abort a rank
        dist.destroy_process_group()
