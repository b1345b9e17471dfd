"""The torchrun worker of ``test_fsdp.py``: two CPU processes (gloo) distil a random-initialised
Llama teacher into a smaller Llama student with FSDP2, in one launch with one restart.

``python -m torch.distributed.run --nproc-per-node 2 --max-restarts 1 _fsdp_worker.py WORK``

* first attempt: ``full``, an uninterrupted run writing checkpoints and sharded states; then
  ``killed``, the same run, in which both ranks SIGKILL themselves once their shards of the
  state of step ``KILL_AT`` are on disk but before it is renamed into place;
* the restart (``TORCHELASTIC_RESTART_COUNT=1``): ``resumed``, the killed run resumed from its
  output directory (the newest complete state, ``KILL_AT - 1``) to the end; then, where purekd
  has token-count normalisation, ``tokens``: one step of a token-normalised forward KL over
  micro-batches and ranks of unequal token counts.

Each run leaves ``WORK/<run>.rank<r>.pt``: the gathered step weights, the files this rank
wrote, what the callback saw, and the parameter counts. The helpers (models, data, adaptor)
are shared with the one-process reference in the test.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

import purekd

VOCAB, LENGTH, SAMPLES, PER_RANK_BATCH, WORLD, EPOCHS = 64, 8, 24, 2, 2, 2
ACCUMULATION = 2
STEPS_PER_EPOCH = SAMPLES // (WORLD * PER_RANK_BATCH * ACCUMULATION)  # 3
CKPT_STEPS = list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))  # a checkpoint every step
KILL_AT = 4  # mid-epoch 2: the resume replays a pass that is under way
SHUFFLE_SEED = 3
MAX_GRAD_NORM = 0.5

DISTILL = {
    "temperature": 2,
    "hard_label_weight": 0.5,
    "intermediate_matches": [  # widths differ: a projection trained (and sharded) with the student
        {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
         "proj": ["linear", 32, 48]},
    ],
}


def llama(hidden: int, layers: int, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2 * LENGTH)
    return LlamaForCausalLM(config)


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(teacher, student); the generator is left seeded for the projection."""
    teacher, student = llama(48, 3, seed=0), llama(32, 2, seed=1)
    torch.manual_seed(2)
    return teacher, student


def dataset() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(VOCAB, (SAMPLES, LENGTH), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def adaptor(batch: Mapping[str, Any], outputs: Any) -> dict[str, Any]:
    return {"logits": outputs.logits.flatten(0, 1), "hidden": outputs.hidden_states,
            "losses": outputs.loss}


def probe() -> torch.Tensor:
    """A fixed batch the callback evaluates the model on."""
    return torch.arange(2 * LENGTH).reshape(2, LENGTH) % VOCAB


class EpochPermutations(Sampler[int]):
    """DistributedSampler's order for one replica (``randperm`` seeded ``seed + epoch``), the
    epoch counted by the calls of ``__iter__``: a one-process loader drawing every rank's
    samples of a step as one batch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class Recorder:
    """The callback: the steps it is called at, what model it gets, the model's logits on
    :func:`probe` (a forward every rank makes: with FSDP it is a collective)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.kinds: list[str] = []
        self.logits: torch.Tensor | None = None

    def __call__(self, model: torch.nn.Module, step: int) -> None:
        self.steps.append(step)
        self.kinds.append(type(model).__name__)
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=probe()).logits.detach().clone()


def distiller(config: purekd.TrainingConfig) -> tuple[purekd.GeneralDistiller, torch.nn.Module]:
    teacher, student = models()
    return (purekd.GeneralDistiller(config, DISTILL, teacher, student, adaptor, adaptor,
                                    compile=False), student)


def train(distiller_: purekd.GeneralDistiller, student: torch.nn.Module, loader: DataLoader,
          callback: Recorder, **options: Any) -> None:
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.01)
    with distiller_:
        distiller_.train(optimizer, loader, num_epochs=EPOCHS, max_grad_norm=MAX_GRAD_NORM,
                         callback=callback, scheduler_class=torch.optim.lr_scheduler.StepLR,
                         scheduler_args={"step_size": 2, "gamma": 0.5},
                         output_hidden_states=True, **options)


# -- token-count normalisation over both ranks --------------------------------------------------

TOKEN_IN, TOKEN_VOCAB, TOKEN_LENGTH = 3, 5, 6
TOKEN_KEPT = [6, 1, 4, 2, 5, 3, 6, 2]  # rank 0 keeps 13 tokens, rank 1 keeps 16
TOKEN_LR = 0.5


class TokenLM(torch.nn.Module):
    """(B, L, IN) -> (B, L, VOCAB) token logits, float64."""

    def __init__(self, width: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(TOKEN_IN, width), torch.nn.Tanh(),
                                        torch.nn.Linear(width, TOKEN_VOCAB))
        self.double()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        del mask
        return {"logits": self.body(x)}


def token_adaptor(batch: Any, outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {"logits": outputs["logits"], "logits_mask": batch[1]}


def token_samples() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    data = []
    for kept in TOKEN_KEPT:
        mask = torch.zeros(TOKEN_LENGTH, dtype=torch.long)
        mask[:kept] = 1
        data.append((torch.randn(TOKEN_LENGTH, TOKEN_IN, generator=gen, dtype=torch.float64),
                     mask))
    return data


def token_batches(items: list[tuple[torch.Tensor, torch.Tensor]], size: int) -> list[tuple[Any, ...]]:
    return [(torch.stack([x for x, _ in items[i:i + size]]),
             torch.stack([m for _, m in items[i:i + size]])) for i in range(0, len(items), size)]


def token_normalisation_available() -> bool:
    """Whether this purekd normalises by token counts (``DistillationConfig.loss_normalisation``)."""
    return hasattr(purekd.DistillationConfig, "normalises_by_tokens")


def token_distil(out: Path, rank: int) -> dict[str, torch.Tensor]:
    """One SGD step with forward KL normalised by the step's kept tokens over both ranks and
    two micro-batches each (unequal counts everywhere); the gathered student weights."""
    from purekd.runner import _fsdp

    teacher, student = TokenLM(7, seed=0), TokenLM(4, seed=1)
    config = purekd.DistillationConfig(kd_loss_type="forward_kl", temperature=1,
                                       loss_normalisation="tokens")
    train = purekd.TrainingConfig(device="cpu", output_dir=str(out), gradient_accumulation_steps=2,
                                  fsdp=purekd.FSDPConfig(blocks=("Linear",)))
    distiller_ = purekd.GeneralDistiller(train, config, teacher, student, token_adaptor,
                                         token_adaptor, compile=False)
    half = len(TOKEN_KEPT) // WORLD
    mine = token_samples()[rank * half:(rank + 1) * half]
    with distiller_:
        distiller_.train(torch.optim.SGD(student.parameters(), lr=TOKEN_LR),
                         token_batches(mine, half // 2), num_steps=1)
    return _fsdp.full_state_dict(student)


def main(work: Path) -> None:
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler

    import purekd.runner._loop as loop
    from purekd.runner import _fsdp

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    saves: list[str] = []
    real_save = loop.atomic_save

    def recording_save(obj: Any, path: Any) -> Any:
        saves.append(os.path.basename(path))
        return real_save(obj, path)

    loop.atomic_save = recording_save
    callback = Recorder()
    import torch.distributed.checkpoint as dcp

    real_dcp_save = dcp.save

    def dying_dcp_save(*args: Any, **kwargs: Any) -> Any:
        result = real_dcp_save(*args, **kwargs)
        if callback.steps and callback.steps[-1] == KILL_AT:  # shards written, not yet renamed
            dist.barrier()
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    if attempt > 0:  # torchrun's store still holds the dead attempt's gloo addresses: a fresh one
        dist.init_process_group("gloo", init_method=f"file://{work}/store{attempt}", rank=rank,
                                world_size=world)
        (work / "after_kill.txt").write_text(  # what the killed attempt left
            "\n".join(sorted(p.name for p in (work / "killed").iterdir())))
    runs = ["full", "killed"] if attempt == 0 else ["resumed"]
    for name in runs:
        saves.clear()
        callback.__init__()  # type: ignore[misc]
        out = work / ("killed" if name == "resumed" else name)
        config = purekd.TrainingConfig(device="cpu", output_dir=str(out), fsdp=True,
                                       gradient_accumulation_steps=ACCUMULATION,
                                       ckpt_frequency=STEPS_PER_EPOCH)
        distiller_, student = distiller(config)
        data = dataset()
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True,
                                     seed=SHUFFLE_SEED)
        loader = DataLoader(data, batch_size=PER_RANK_BATCH, sampler=sampler)
        dcp.save = dying_dcp_save if name == "killed" else real_dcp_save  # type: ignore[assignment]
        train(distiller_, student, loader, callback, save_state=True,
              resume_from=str(out) if name == "resumed" else None)
        full = _fsdp.full_state_dict(distiller_.step)
        torch.save({"weights": full, "saves": list(saves), "steps": callback.steps,
                    "kinds": callback.kinds, "logits": callback.logits,
                    "local_numel": _fsdp.local_numel(student.parameters()),
                    "numel": sum(p.numel() for p in student.parameters()),
                    "world": dist.get_world_size()},
                   work / f"{name}.rank{rank}.pt")
    if attempt > 0 and token_normalisation_available():
        torch.save(token_distil(work / "tokens", rank), work / f"tokens.rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    import torch.distributed as dist
    if dist.is_initialized():  # a gloo group left open at exit can abort the process
        dist.destroy_process_group()
