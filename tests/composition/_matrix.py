"""The composition matrix: one tiny GPT-2 distillation run per combination of

* KD form — ``logits``, ``topk`` (a top-k teacher cache in the batches), ``fused`` (the output
  layer fused with the loss, ``hf_adaptor(lm_head=...)``), ``fused+topk``; and on-policy
  (``onpolicy``, ``onpolicy+fused``: the student samples greedy completions of prompts, the
  KD loss runs on them, normalised by the sampled tokens of the optimizer step);
* placement — ``single`` (one process), ``ddp``, ``shard`` / ``replicate`` / ``none`` (FSDP2
  with the teacher sharded, replicated or absent), ``keep`` (FSDP2, teacher sharded, the
  student's blocks and root kept gathered from the forward to the backward:
  ``reshard_after_forward=False``, so the fused path reads the gathered output layer, not a
  shard);
* precision — ``fp32``, ``bf16``; gradient accumulation — 1 or 2 micro-batches per step;
* an optional SIGKILL while a state is written, and a resume from the output directory.

Teacher and student are random-initialised GPT-2s with tied input and output embeddings (no
dropout). Every run sees the same global batches: ``GLOBAL_BATCH`` samples a step, split over
the ranks by an unshuffled ``DistributedSampler`` and over the micro-batches; every row keeps
the same number of tokens, so the mean of the per-micro-batch means is the mean over the step.
The plain reference is one process, fp32, no accumulation.

As a script, under torchrun: ``_matrix.py WORK COMBO [COMBO ...]`` runs each combination and
writes rank 0's gathered final weights (or the error it raised) to ``WORK/<combo>.pt``. A combo
ending in ``+kill`` SIGKILLs every rank once the shards of the state of step ``KILL_AT`` are
written; on torchrun's restart (``--max-restarts``) it is resumed from its output directory.
Without torchrun (``single`` combos) it runs in this process.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, DistributedSampler

import purekd
from purekd.integrations.huggingface import hf_adaptor

VOCAB, LENGTH, SAMPLES, K = 64, 8, 16, 8
GLOBAL_BATCH, EPOCHS, LR, ADAMW_LR = 8, 2, 0.5, 1e-2
STEPS = EPOCHS * SAMPLES // GLOBAL_BATCH  # 4, a checkpoint after each
KILL_AT = 3  # SIGKILLed while the state of step 3 is written: resumes from step 2
DISTILL = {"kd_loss_type": "forward_kl", "temperature": 2.0}

FORMS = ("logits", "topk", "fused", "fused+topk")
ON_POLICY_FORMS = ("onpolicy", "onpolicy+fused")
PROMPT, MAX_NEW_TOKENS = 3, 4
# greedy (top_k=1): the rollouts do not depend on how the batch is split over ranks and
# micro-batches; stop ids that the student reaches, so completions differ in length
ON_POLICY = {"max_new_tokens": MAX_NEW_TOKENS, "top_k": 1, "seed": 3,
             "stop_token_ids": list(range(0, VOCAB, 3))}
PLACEMENTS = ("single", "ddp", "shard", "replicate", "none", "keep")
DISTRIBUTED = PLACEMENTS[1:]


class Combo(NamedTuple):
    form: str
    placement: str
    precision: str = "fp32"
    accumulation: int = 1
    kill: bool = False

    @property
    def name(self) -> str:
        return (f"{self.form}-{self.placement}-{self.precision}-acc{self.accumulation}"
                + ("+kill" if self.kill else ""))

    @classmethod
    def parse(cls, name: str) -> Combo:
        kill = name.endswith("+kill")
        form, placement, precision, acc = name.removesuffix("+kill").rsplit("-", 3)
        return cls(form, placement, precision, int(acc.removeprefix("acc")), kill)

    @property
    def cached(self) -> bool:
        return self.form in ("topk", "fused+topk")

    @property
    def fused(self) -> bool:
        return self.form in ("fused", "fused+topk", "onpolicy+fused")

    @property
    def on_policy(self) -> bool:
        return self.form in ON_POLICY_FORMS


def gpt2(width: int, layers: int, seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=2 * LENGTH, n_embd=width, n_layer=layers,
                        n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)  # tied: lm_head.weight is transformer.wte.weight


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(teacher, student), the same on every call."""
    return gpt2(32, 2, seed=0), gpt2(16, 2, seed=1)


def samples() -> list[dict[str, torch.Tensor]]:
    """Token rows; the first label of each is ``-100`` (every row keeps the same count)."""
    ids = torch.randint(VOCAB, (SAMPLES, LENGTH), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, 0] = -100
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y}
            for i, y in zip(ids, labels, strict=True)]


def topk_cache(teacher: torch.nn.Module, rows: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """What a top-k teacher cache holds per sample: the teacher's top ``K`` ids and
    log-probabilities (temperature 1) at every position, and a mask of the positions."""
    batch = {key: torch.stack([r[key] for r in rows]) for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher(**batch).logits.float(), -1)
    top = logprobs.topk(K, dim=-1)
    return [{"topk_ids": ids, "topk_logprobs": lp, "topk_mask": torch.ones(LENGTH, dtype=torch.long)}
            for ids, lp in zip(top.indices, top.values, strict=True)]


def prompts() -> list[dict[str, torch.Tensor]]:
    """The first ``PROMPT`` tokens of each sample, as on-policy prompts (all of one length: no
    padding)."""
    return [{"prompts": row["input_ids"][:PROMPT],
             "prompt_attention_mask": torch.ones(PROMPT, dtype=torch.long)} for row in samples()]


def dataset(combo: Combo) -> list[dict[str, Any]]:
    if combo.on_policy:
        return prompts()
    rows = samples()
    if not combo.cached:
        return rows
    cache = topk_cache(models()[0], rows)
    return [{"student": r, "teacher": r, "teacher_cache": c} for r, c in zip(rows, cache, strict=True)]


def training_config(combo: Combo, out: Path) -> purekd.TrainingConfig:
    fsdp = (purekd.FSDPConfig(teacher=combo.placement)
            if combo.placement in ("shard", "replicate", "none") else None)
    if combo.placement == "keep":
        fsdp = purekd.FSDPConfig(teacher="shard", reshard_after_forward=False)
    return purekd.TrainingConfig(device="cpu", output_dir=str(out), fsdp=fsdp,
                                 bf16=combo.precision == "bf16",
                                 gradient_accumulation_steps=combo.accumulation,
                                 ckpt_frequency=SAMPLES // GLOBAL_BATCH)


def distiller(combo: Combo, out: Path) -> tuple[purekd.GeneralDistiller, torch.nn.Module]:
    teacher, student = models()
    adaptor_T = hf_adaptor(causal=True, lm_head=teacher.get_output_embeddings()
                           if combo.form in ("fused", "onpolicy+fused") else None)
    adaptor_S = hf_adaptor(causal=True, lm_head=student.get_output_embeddings()
                           if combo.fused else None)
    config = {**DISTILL, "on_policy": ON_POLICY} if combo.on_policy else DISTILL
    return (purekd.GeneralDistiller(training_config(combo, out), config, teacher, student,
                                    adaptor_T, adaptor_S, compile=False), student)


def loader(combo: Combo, world: int, rank: int, per_micro: int | None = None) -> DataLoader:
    """The global batches, split over ``world`` ranks and the micro-batches (``per_micro``:
    another per-process batch size)."""
    data = dataset(combo)
    per_micro = per_micro or GLOBAL_BATCH // (world * combo.accumulation)
    sampler = (DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
               if combo.placement != "single" else None)
    return DataLoader(data, batch_size=per_micro, sampler=sampler)


def train(combo: Combo, out: Path, *, world: int = 1, rank: int = 0, resume: bool = False,
          resume_from: Path | None = None, adamw: bool = False, save_state: bool = False,
          per_micro: int | None = None) -> dict[str, torch.Tensor]:
    """One run to the end (``resume``: from its output directory; ``resume_from``: from that
    state); the student's final weights (gathered, on rank 0; ``{}`` on the others under
    FSDP). SGD at ``LR``, or AdamW at ``ADAMW_LR``."""
    from purekd.runner import full_state_dict

    distiller_, student = distiller(combo, out)
    optimizer = (torch.optim.AdamW(student.parameters(), lr=ADAMW_LR) if adamw
                 else torch.optim.SGD(student.parameters(), lr=LR))
    args: dict[str, Any] = {"output_hidden_states": True} if combo.fused else {}
    origin = resume_from if resume_from is not None else (out if resume else None)
    with distiller_:
        distiller_.train(optimizer, loader(combo, world, rank, per_micro), num_epochs=EPOCHS,
                         save_state=combo.kill or save_state,
                         resume_from=None if origin is None else str(origin),
                         overwrite_output_dir=None if origin is not None else True, **args)
    if combo.placement in ("shard", "replicate", "none", "keep"):
        return full_state_dict(student)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def reference(form: str, out: Path) -> dict[str, torch.Tensor]:
    """The plain reference: one process, fp32, no accumulation."""
    return train(Combo(form, "single"), out)


def _result(work: Path, combo: Combo) -> Path:
    return work / f"{combo.name}.pt"


def _die_after_shards(kill_at: int) -> None:
    """SIGKILL every rank once its shards of the state of ``kill_at`` are written (before the
    directory is renamed into place); one-process runs die while the state file is written."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    real = dcp.save

    def dying(state: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        result = real(state, *args, **kwargs)
        if f"gs{kill_at}.state" in str(kwargs.get("checkpoint_id", "")):
            dist.barrier()
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    dcp.save = dying  # type: ignore[assignment]
    import purekd.runner._state as state

    real_write = state.write

    def dying_write(saved: dict[str, Any], output_dir: Any) -> Any:
        if saved["counters"]["global_step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(saved, output_dir)

    state.write = dying_write  # type: ignore[assignment]


def main(work: Path, names: list[str]) -> None:
    import torch.distributed as dist

    from purekd.losses import _blockwise

    torch.set_num_threads(1)
    _blockwise.COMPILE_BLOCKS = False  # eager block kernels: the same values, no compile time
    combos = [Combo.parse(n) for n in names]
    launched = "LOCAL_RANK" in os.environ
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if launched and attempt > 0:  # torchrun's store holds the dead attempt's addresses
        dist.init_process_group("gloo", init_method=f"file://{work}/store{attempt}", rank=rank,
                                world_size=world)
    killed = [c for c in combos if c.kill]
    for combo in combos:
        out = work / combo.name
        if combo.kill:
            index = killed.index(combo)
            if index < attempt - 1 or (index == attempt - 1 and _result(work, combo).exists()):
                continue  # done in an earlier attempt
            if index == attempt - 1:  # killed in the previous attempt: resume it
                weights = train(combo, out, world=world, rank=rank, resume=True)
                if rank == 0:
                    torch.save({"weights": weights}, _result(work, combo))
                continue
            if index > attempt:
                continue
            _die_after_shards(KILL_AT)
            train(combo, out, world=world, rank=rank)
            raise AssertionError(f"{combo.name}: not killed at step {KILL_AT}")
        if attempt > 0:
            continue
        try:
            weights = train(combo, out, world=world, rank=rank)
            report: dict[str, Any] = {"weights": weights}
        except Exception as error:  # a refusal (or a bug): recorded, the next combo runs
            report = {"error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()}
        if rank == 0:
            torch.save(report, _result(work, combo))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
    import torch.distributed as dist
    if dist.is_initialized():  # a gloo group left open at exit can abort the process
        dist.destroy_process_group()
