"""Run every benchmark and print one ratio table; writes ``results/all.json``.

    python -m benchmarks.run_all [--quick] [--out FILE]

Each benchmark also runs on its own (``python -m benchmarks.<name> --help``). On a machine with
a GPU they run there (CUDA when available). Figures are only meaningful on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, device, machine


def _rows(results: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    rows = []
    step = results.get("step_loss_heavy")
    if step:
        ratios = {name: r["ratio"] for name, r in step["results"].items()}
        rows.append(("loss-heavy step vs TextBrewer", ratios["step"], "<= 0.50",
                     ratios["step"] <= 0.5))
        rows.append(("loss path alone vs TextBrewer", ratios["loss_path"], "<= 0.30",
                     ratios["loss_path"] <= 0.3))
    bert = results.get("bert_end_to_end")
    if bert:
        rows.append(("BERT end-to-end: runner vs hand-written loop", bert["runner_vs_hand"],
                     "<= 1.02", bert["runner_vs_hand"] <= 1.02))
        rows.append(("BERT end-to-end: runner vs TextBrewer", bert["runner_vs_textbrewer"],
                     "<= 1.00", bert["runner_vs_textbrewer"] <= 1.00))
    tokens = results.get("random_tokens")
    if tokens:
        rows.append(("TextBrewer's random-tokens example, defaults, vs TextBrewer",
                     tokens["default_vs_textbrewer"], "<= 1.00",
                     tokens["default_vs_textbrewer"] <= 1.00))
    token = results.get("token_kd")
    if token:
        rows.append(("token KD 4096x32000: time vs TextBrewer", token["time_ratio"], "<= 0.40",
                     token["time_ratio"] <= 0.4))
        rows.append(("token KD 4096x32000: extra peak memory vs TextBrewer",
                     token["memory_ratio"], "<= 0.30", token["memory_ratio"] <= 0.3))
    fused = results.get("fused_kd")
    if fused:
        for key, label in (("default", "4096x49152"), ("llama3_vocab", "2048x128256")):
            record = fused.get(key)
            if not record:
                continue
            for other, time_target, memory_target in (("liger", 1.0, 0.5), ("naive", 0.3, 0.05)):
                if f"time_vs_{other}" in record:
                    rows.append((f"fused JSD {label}: time vs {other}",
                                 record[f"time_vs_{other}"], f"<= {time_target:.2f}",
                                 record[f"time_vs_{other}"] <= time_target))
                    rows.append((f"fused JSD {label}: extra peak memory vs {other}",
                                 record[f"memory_vs_{other}"], f"<= {memory_target:.2f}",
                                 record[f"memory_vs_{other}"] <= memory_target))
    cached = results.get("cached_teacher")
    if cached:
        rows.append(("cached-teacher epoch vs student-only epoch", cached["ratio"], "<= 1.05",
                     cached["ratio"] <= 1.05))
    topk = results.get("cached_topk")
    if topk:
        rows.append(("top-k cache epoch vs student-only epoch", topk["ratio"], "<= 1.05",
                     topk["ratio"] <= 1.05))
    on_policy = results.get("on_policy_trl")
    if on_policy:
        ratio = on_policy["time_ratio"]["median"]
        rows.append(("on-policy step vs trl.DistillationTrainer: time", ratio, "<= 0.70",
                     ratio <= 0.7))
        if on_policy.get("memory_ratio") is not None:
            memory = on_policy["memory_ratio"]
            rows.append(("on-policy step vs trl.DistillationTrainer: extra peak memory", memory,
                         "<= 0.50", memory <= 0.5))
    return rows


def table(results: dict[str, Any]) -> str:
    rows = _rows(results)
    width = max(len(r[0]) for r in rows) if rows else 10
    lines = [f"{'benchmark':<{width}}  {'ratio':>7}  {'target':>8}  met",
             "-" * (width + 25)]
    lines += [f"{name:<{width}}  {ratio:>6.3f}x  {target:>8}  {'yes' if ok else 'NO'}"
              for name, ratio, target, ok in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--out", default=str(RESULTS / "all.json"))
    args = parser.parse_args()
    from benchmarks import (
        bert_end_to_end,
        cached_teacher,
        cached_topk,
        fused_kd,
        on_policy_trl,
        random_tokens,
        step_loss_heavy,
        token_kd,
    )

    results: dict[str, Any] = {}
    started = time.perf_counter()
    step_args = ["--small", "--runs", "9", "--warmup", "1"] if args.quick else ["--runs", "9"]
    step_args += ["--device", str(device())]
    results["step_loss_heavy"] = step_loss_heavy.main(
        [*step_args, "--out", str(RESULTS / "step_loss_heavy.json")])
    results["bert_end_to_end"] = (bert_end_to_end.run(2, 2) if args.quick
                                  else bert_end_to_end.run(8, 9))
    results["random_tokens"] = (random_tokens.run(1, 1) if args.quick
                                else random_tokens.run(3, 10))
    results["token_kd"] = token_kd.run(512, 4096, 2) if args.quick else token_kd.run()
    results["cached_teacher"] = (cached_teacher.run(2, 1, 1) if args.quick
                                 else cached_teacher.run())
    results["cached_topk"] = (cached_topk.run(8, 32, 2048, 4, 1, 1) if args.quick
                              else cached_topk.run())
    # fused output-layer JSD; the naive variant needs ~13 GB at the full size
    results["fused_kd"] = ({"default": fused_kd.run(512, 64, 4096, 1)} if args.quick else
                           {"default": fused_kd.run(),
                            "llama3_vocab": fused_kd.run(2048, 512, 128256)})
    # on-policy distillation vs trl.DistillationTrainer (SmolLM2 teacher; --quick: small Llamas)
    results["on_policy_trl"] = (
        on_policy_trl.run(on_policy_trl.Workload(small=True), rounds=2, warmup=1,
                          rollout_repeats=1) if args.quick else on_policy_trl.run())
    print()
    print(table(results))
    record = {"machine": machine(), "seconds": time.perf_counter() - started, **results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2, default=str))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
