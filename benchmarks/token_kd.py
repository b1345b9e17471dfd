"""Token-level KD over a large vocabulary: purekd's kd_ce vs TextBrewer's kd_ce_loss.

4096 tokens x 32000 classes, forward + backward, temperature 2. Time: median of several runs.
Extra peak memory: each variant runs in its own process; peak resident memory (CPU, with
glibc's mmap threshold fixed so freed blocks leave at once) or peak allocated memory (CUDA),
minus what the inputs occupy. Targets: time <= 0.4x, memory <= 0.3x.

    python -m benchmarks.token_kd [--tokens 4096] [--classes 32000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks._common import device, extra_peak_mib, median_time, run_isolated, synchronize, write


def _inputs(tokens: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits_S = torch.randn(tokens, classes, generator=generator).to(device()).requires_grad_(True)
    logits_T = torch.randn(tokens, classes, generator=generator).to(device())
    return logits_S, logits_T


def _loss_fn(which: str):  # type: ignore[no-untyped-def]
    if which == "textbrewer":
        from textbrewer.losses import kd_ce_loss

        return kd_ce_loss
    from purekd.losses import kd_ce

    return kd_ce


def measure_memory(which: str, tokens: int, classes: int) -> dict[str, float]:
    """In this (fresh) process: extra peak memory of one forward + backward, in MiB."""
    fn = _loss_fn(which)
    logits_S, logits_T = _inputs(tokens, classes)
    if which != "textbrewer":  # compile the chunked block kernels outside the measurement
        from purekd.losses import kd_ce_chunked
        from purekd.losses._chunked import DEFAULT_CHUNK_ROWS

        small_S, small_T = _inputs(DEFAULT_CHUNK_ROWS, classes)
        kd_ce_chunked(small_S, small_T, 2.0).backward()
    synchronize()
    extra = extra_peak_mib(lambda: fn(logits_S, logits_T, 2.0).backward())
    return {"extra_peak_mib": extra}


def run(tokens: int = 4096, classes: int = 32000, repeats: int = 5) -> dict[str, float]:
    logits_S, logits_T = _inputs(tokens, classes)
    times = {}
    values = {}
    for which in ("textbrewer", "purekd"):
        fn = _loss_fn(which)

        def once(fn=fn) -> None:  # type: ignore[no-untyped-def]
            logits_S.grad = None
            fn(logits_S, logits_T, 2.0).backward()

        times[which] = median_time(once, repeats=repeats, warmup=1)
        values[which] = float(fn(logits_S, logits_T, 2.0).detach())
    # glibc's malloc keeps large freed blocks mapped (its mmap threshold grows with use), so
    # resident memory would count blocks already freed; a fixed threshold returns them at once
    # and resident memory tracks the live tensors, for both libraries alike.
    live = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    memory = {w: run_isolated("benchmarks.token_kd", "--memory-of", w, "--tokens", str(tokens),
                              "--classes", str(classes), env=live)["extra_peak_mib"]
              for w in ("textbrewer", "purekd")}
    return {
        "tokens": tokens, "classes": classes,
        "textbrewer_s": times["textbrewer"], "purekd_s": times["purekd"],
        "time_ratio": times["purekd"] / times["textbrewer"],
        "textbrewer_extra_mib": memory["textbrewer"], "purekd_extra_mib": memory["purekd"],
        "memory_ratio": memory["purekd"] / memory["textbrewer"],
        "loss_difference": abs(values["purekd"] - values["textbrewer"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-of", choices=["textbrewer", "purekd"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args.tokens, args.classes)))
        return
    result = run(args.tokens, args.classes, args.repeats)
    print(json.dumps(result, indent=2))
    write("token_kd", result, args.out)


if __name__ == "__main__":
    main()
