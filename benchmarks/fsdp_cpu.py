"""FSDP2 vs DDP vs one process on CPU: step time on the same global batch, and what each
process holds (parameters, optimizer state).

A random-initialised Llama teacher (512 wide, 6 layers) is distilled into a Llama student (256
wide, 4 layers; vocabulary 2048, 64 tokens, global batch 8) with ``GeneralDistiller`` (logits KD,
hard labels, a hidden-state match through a projection, AdamW, clipping). Three variants, each
in its own processes: one process on the global batch (2 intra-op threads), DDP on two
processes (1 thread each, 4 samples each), FSDP2 on two processes with the teacher sharded
(same). Every variant runs ``--warmup`` + ``--steps`` optimizer steps; the step time is the
median interval between optimizer steps after the warm-up. On CPU, gloo's collectives are the
correctness path, not a fast one: read the ratios as the price of sharding on this machine.

    python -m benchmarks.fsdp_cpu [--steps 6] [--warmup 2] [--out FILE]
    torchrun --nproc-per-node 2 -m benchmarks.fsdp_cpu --variant fsdp     # one variant
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import peak_rss_mib, write

VOCAB, LENGTH, GLOBAL_BATCH, WORLD = 2048, 64, 8, 2
STUDENT, TEACHER = (256, 4), (512, 6)
REPO = Path(__file__).resolve().parent.parent


def llama(hidden: int, layers: int, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden,
                                        intermediate_size=2 * hidden, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=LENGTH))


def adaptor(batch: Any, outputs: Any) -> dict[str, Any]:
    return {"logits": outputs.logits.flatten(0, 1), "hidden": outputs.hidden_states,
            "losses": outputs.loss}


def _bytes(tensors: Any) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def measure(variant: str, steps: int, warmup: int, single_threads: int = WORLD) -> dict[str, Any]:
    """Train one variant in this process (under torchrun for ``ddp`` and ``fsdp``)."""
    import purekd

    distributed = variant != "single"
    torch.set_num_threads(1 if distributed else single_threads)
    rank = int(os.environ.get("RANK", "0"))
    teacher, student = llama(*TEACHER, seed=0), llama(*STUDENT, seed=1)
    distill = {"temperature": 2, "hard_label_weight": 0.5, "intermediate_matches": [
        {"layer_T": TEACHER[1], "layer_S": STUDENT[1], "feature": "hidden", "loss": "hidden_mse",
         "weight": 1, "proj": ["linear", STUDENT[0], TEACHER[0]]}]}
    out = tempfile.mkdtemp(prefix=f"fsdp-bench-{variant}-")
    config = purekd.TrainingConfig(device="cpu", output_dir=out, ckpt_steps=10**6,
                                   fsdp=purekd.FSDPConfig(teacher="shard")
                                   if variant == "fsdp" else None)
    distiller = purekd.GeneralDistiller(config, distill, teacher, student, adaptor, adaptor,
                                        compile=False)
    per_process = GLOBAL_BATCH // WORLD if distributed else GLOBAL_BATCH
    generator = torch.Generator().manual_seed(rank)
    batches = []
    for _ in range(steps + warmup):
        ids = torch.randint(VOCAB, (per_process, LENGTH), generator=generator)
        batches.append({"input_ids": ids, "labels": ids})
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    stamps: list[float] = []
    optimizer.register_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    with distiller:
        distiller.train(optimizer, batches, num_steps=steps + warmup, max_grad_norm=1.0,
                        output_hidden_states=True)
    intervals = [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:], strict=False)]
    optimizer_state = [v for state in optimizer.state.values() for v in state.values()
                       if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {
        "variant": variant,
        "step_s": statistics.median(intervals),
        "student_param_bytes": _bytes(student.parameters()),
        "teacher_param_bytes": _bytes(teacher.parameters()),
        "optimizer_state_bytes": _bytes(optimizer_state),
        "student_param_count": sum(p.numel() for p in student.parameters()),
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
    }


def _launch(variant: str, steps: int, warmup: int, single_threads: int) -> dict[str, Any]:
    args = ["-m", "benchmarks.fsdp_cpu", "--variant", variant, "--steps", str(steps),
            "--warmup", str(warmup), "--single-threads", str(single_threads)]
    if variant != "single":
        args = ["-m", "torch.distributed.run", f"--nproc-per-node={WORLD}", "--standalone",
                *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if variant != "single" else str(single_threads)}
    done = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True,
                          cwd=REPO, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return dict(json.loads(lines[-1]))


def run(steps: int = 6, warmup: int = 2, single_threads: int = WORLD) -> dict[str, Any]:
    results = {variant: _launch(variant, steps, warmup, single_threads)
               for variant in ("single", "ddp", "fsdp")}
    single = results["single"]["step_s"]
    return {
        "results": results,
        "fsdp_vs_single": results["fsdp"]["step_s"] / single,
        "ddp_vs_single": results["ddp"]["step_s"] / single,
        "fsdp_vs_ddp": results["fsdp"]["step_s"] / results["ddp"]["step_s"],
        "student_params_per_rank_fsdp_vs_ddp": (results["fsdp"]["student_param_bytes"]
                                                / results["ddp"]["student_param_bytes"]),
        "teacher_params_per_rank_fsdp_vs_ddp": (results["fsdp"]["teacher_param_bytes"]
                                                / results["ddp"]["teacher_param_bytes"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=("single", "ddp", "fsdp"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--single-threads", type=int, default=WORLD,
                        help="intra-op threads of the one-process variant (default 2: the cores "
                             "the two processes use; on a loaded machine 1 is steadier)")
    parser.add_argument("--out", default=None)
    options = parser.parse_args()
    if options.variant is not None:
        result = measure(options.variant, options.steps, options.warmup, options.single_threads)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result), flush=True)
        return
    record = run(options.steps, options.warmup, options.single_threads)
    mib = 2**20
    print(f"{'variant':8} {'step (s)':>9} {'student params/rank':>20} {'teacher params/rank':>20} "
          f"{'AdamW state/rank':>17}")
    for name, r in record["results"].items():
        print(f"{name:8} {r['step_s']:9.3f} {r['student_param_bytes'] / mib:17.2f} MiB "
              f"{r['teacher_param_bytes'] / mib:17.2f} MiB {r['optimizer_state_bytes'] / mib:14.2f} MiB")
    print(f"step time: FSDP2/one process {record['fsdp_vs_single']:.2f}x, DDP/one process "
          f"{record['ddp_vs_single']:.2f}x, FSDP2/DDP {record['fsdp_vs_ddp']:.2f}x")
    write("fsdp_cpu", record, options.out)


if __name__ == "__main__":
    main()
