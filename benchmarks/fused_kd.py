"""Fused output-layer distillation: purekd's fused_linear_kd vs Liger-Kernel and the naive way.

JSD(beta=0.5) of a student against a teacher from their last hidden states and output-layer
weights, forward + backward, 10% of the tokens ignored:

* ``naive`` — both models' logits materialised (the teacher's without grad) and TRL's
  ``GKDTrainer.generalized_jsd_loss``;
* ``liger`` — Liger-Kernel's ``LigerFusedLinearJSDLoss`` (its chunked loss, compiled; hard-loss
  weight 0, soft-loss weight 1: the same value);
* ``purekd`` — ``purekd.losses.fused_linear_kd(..., loss="jsd", beta=0.5)``.

Each measurement runs in its own process (fresh allocator, compilation outside the
measurement). Time: the median of a few forward + backward passes with the allocator as users
have it, in ``--rounds`` processes per variant, alternating variants (the reported time is
the median over rounds). Memory: the extra peak of one pass, in one more process per variant
(peak resident memory on CPU with glibc's mmap threshold fixed so freed blocks leave at once —
every large allocation then page-faults anew, so that process's time, reported as
``seconds_fresh_pages``, penalises allocating code; or peak allocated memory on CUDA), minus
what the inputs occupy; the weight gradient counts for everyone. The values must agree. Targets: time <= 1.0x Liger and <= 0.3x naive; extra peak
memory <= 0.5x Liger and <= 0.05x naive. The naive variant needs ~13 GB at the default size.

    python -m benchmarks.fused_kd [--tokens 4096 --hidden 576 --vocab 49152] [--large] [--out F]

``--large`` adds the second configuration, N=2048, H=512, V=128256 (Llama 3's vocabulary).
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch

from benchmarks._common import device, extra_peak_mib, median_time, run_isolated, synchronize, write

VARIANTS = ("naive", "liger", "purekd")
BETA = 0.5


def _inputs(tokens: int, hidden: int, vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=generator)).to(device())

    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[torch.rand(tokens, generator=generator) < 0.1] = -100
    return {
        "hidden_S": randn(tokens, hidden).requires_grad_(True),
        "weight_S": randn(vocab, hidden, scale=hidden ** -0.5).requires_grad_(True),
        "hidden_T": randn(tokens, hidden),
        "weight_T": randn(vocab, hidden, scale=2 * hidden ** -0.5),
        "labels": labels.to(device()),
    }


def _loss_fn(which: str):  # type: ignore[no-untyped-def]
    if which == "naive":
        import os

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        try:  # trl >= 1.0 keeps GKD among its experimental trainers
            from trl.experimental.gkd import GKDTrainer
        except ImportError:  # older trl
            from trl import GKDTrainer

        def naive(x: dict[str, torch.Tensor]) -> torch.Tensor:
            logits_S = x["hidden_S"] @ x["weight_S"].t()
            with torch.no_grad():
                logits_T = x["hidden_T"] @ x["weight_T"].t()
            return GKDTrainer.generalized_jsd_loss(logits_S, logits_T, labels=x["labels"],
                                                   beta=BETA)

        return naive
    if which == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA,
                                         compiled=True)

        def liger(x: dict[str, torch.Tensor]) -> torch.Tensor:
            return module(x["hidden_S"], x["weight_S"], x["hidden_T"], x["weight_T"],
                          x["labels"])

        return liger
    from purekd.losses import fused_linear_kd

    def purekd(x: dict[str, torch.Tensor]) -> torch.Tensor:
        return fused_linear_kd(x["hidden_S"], x["weight_S"], x["hidden_T"], x["weight_T"],
                               loss="jsd", beta=BETA, mask=x["labels"] != -100)

    return purekd


def measure(which: str, tokens: int, hidden: int, vocab: int, repeats: int,
            memory: bool) -> dict[str, float]:
    """In this (fresh) process: value and median time of fwd + bwd; with ``memory``, also the
    extra peak memory of one."""
    fn = _loss_fn(which)
    x = _inputs(tokens, hidden, vocab)

    def once() -> torch.Tensor:
        x["hidden_S"].grad = x["weight_S"].grad = None
        loss = fn(x)
        loss.backward()
        return loss.detach()

    value = float(once())  # also compiles
    seconds = median_time(once, repeats=repeats, warmup=0)
    if not memory:
        return {"value": value, "seconds": seconds}
    x["hidden_S"].grad = x["weight_S"].grad = None
    synchronize()
    extra = extra_peak_mib(lambda: fn(x).backward())
    return {"value": value, "seconds_fresh_pages": seconds, "extra_peak_mib": extra}


def run(tokens: int = 4096, hidden: int = 576, vocab: int = 49152, repeats: int = 3,
        variants: tuple[str, ...] = VARIANTS, rounds: int = 2) -> dict[str, Any]:
    shape = ("--tokens", str(tokens), "--hidden", str(hidden), "--vocab", str(vocab),
             "--repeats", str(repeats))
    times: dict[str, list[float]] = {w: [] for w in variants}
    for index in range(rounds):
        for w in (variants if index % 2 == 0 else variants[::-1]):
            times[w].append(run_isolated("benchmarks.fused_kd", "--measure", w, *shape)["seconds"])
    # glibc keeps large freed blocks mapped unless its mmap threshold is fixed (see token_kd)
    live = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    results = {w: run_isolated("benchmarks.fused_kd", "--measure", w, "--memory", *shape,
                               env=live) for w in variants}
    for w in variants:
        results[w].update(seconds=statistics.median(times[w]), seconds_rounds=times[w])
    record: dict[str, Any] = {"tokens": tokens, "hidden": hidden, "vocab": vocab,
                              "beta": BETA, "ignored": 0.1, "variants": results}
    mine = results.get("purekd")
    for other in ("liger", "naive"):
        if mine and other in results:
            record[f"time_vs_{other}"] = mine["seconds"] / results[other]["seconds"]
            record[f"memory_vs_{other}"] = (mine["extra_peak_mib"]
                                            / results[other]["extra_peak_mib"])
            record[f"value_difference_{other}"] = abs(mine["value"] - results[other]["value"])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large", action="store_true",
                        help="also N=2048, H=512, V=128256 (Llama 3's vocabulary)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2,
                        help="timing processes per variant, alternating variants")
    parser.add_argument("--measure", choices=VARIANTS)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.tokens, args.hidden, args.vocab,
                                 args.repeats, args.memory)))
        return
    variants = tuple(args.variants.split(","))
    result: dict[str, Any] = {"default": run(args.tokens, args.hidden, args.vocab, args.repeats,
                                             variants, args.rounds)}
    if args.large:
        result["llama3_vocab"] = run(2048, 512, 128256, args.repeats, variants, args.rounds)
    print(json.dumps(result, indent=2))
    write("fused_kd", result, args.out)


if __name__ == "__main__":
    main()
