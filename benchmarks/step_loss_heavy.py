"""A loss-heavy distillation step: purekd's compiled step against TextBrewer 0.2.1's.

The models are trivial (they return pre-made tensors; the student's are parameters), so the time
is the loss path's: logits KD plus, on each of 4 layers, ``attention_ce`` + ``hidden_mse`` +
``cos`` with an ``inputs_mask`` that pads part of every other sequence — batch 16, length 128,
12 heads, width 768 by default.

Two comparisons, each forward + backward, medians of ``--runs`` interleaved runs in one process:

* step: ``step(batch)`` (purekd with the defaults — ``compile="auto"`` compiles this loss path —
  after warm-up) vs ``GeneralDistiller.train_on_batch``;
* loss path alone: purekd's compiled objective on pre-made ``Adapted`` outputs vs TextBrewer's
  ``compute_loss`` on the equivalent dicts.

Targets: step <= 0.5x TextBrewer, loss path <= 0.3x. The two implementations' losses must agree.

    python -m benchmarks.step_loss_heavy [--runs 11] [--out benchmarks/results/step_loss_heavy.json]
                                         [--profile] [--device cpu|cuda] [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import textbrewer
import torch
from textbrewer.distiller_utils import post_adaptor
from torch import nn

import purekd
from purekd.terms import make_context

TARGETS = {"step": 0.5, "loss_path": 0.3}
RESULTS = Path(__file__).resolve().parent / "results"


class Premade(nn.Module):
    """A model that returns pre-made outputs: parameters for a student, plain tensors for a
    teacher. ``forward(input_ids, attention_mask) -> (logits, hidden, attention)``."""

    def __init__(self, logits: torch.Tensor, hidden: list[torch.Tensor],
                 attention: list[torch.Tensor], trainable: bool):
        super().__init__()
        self.trainable = trainable
        if trainable:
            self.logits = nn.Parameter(logits)
            self.hidden = nn.ParameterList(hidden)
            self.attention = nn.ParameterList(attention)
        else:
            self.register_buffer("logits", logits)
            self._hidden, self._attention = hidden, attention

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        del input_ids, attention_mask
        if self.trainable:
            return self.logits, list(self.hidden), list(self.attention)
        return self.logits, self._hidden, self._attention


def adaptor(batch: Any, outputs: Any) -> dict[str, Any]:
    logits, hidden, attention = outputs
    return {"logits": logits, "hidden": hidden, "attention": attention, "inputs_mask": batch[1]}


def build(size: dict[str, int], device: str) -> tuple[Premade, Premade, tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    b, length, heads, width, layers, classes = (size[k] for k in (
        "batch", "length", "heads", "width", "layers", "classes"))

    def outputs(trainable: bool) -> Premade:
        logits = torch.randn(b, classes, generator=gen)
        hidden = [torch.randn(b, length, width, generator=gen) for _ in range(layers + 1)]
        attention = [torch.randn(b, heads, length, length, generator=gen) for _ in range(layers)]
        return Premade(logits, hidden, attention, trainable).to(device)

    mask = torch.ones(b, length, dtype=torch.long)
    for row in range(1, b, 2):  # every other sequence padded, by 1/8 to 1/2 of its length
        mask[row, length - length // (2 + row % 7):] = 0
    batch = (torch.zeros(b, length, dtype=torch.long, device=device), mask.to(device))
    matches = []
    for i in range(layers):
        matches += [
            {"layer_T": i, "layer_S": i, "feature": "attention", "loss": "attention_ce", "weight": 1},
            {"layer_T": i + 1, "layer_S": i + 1, "feature": "hidden", "loss": "hidden_mse",
             "weight": 1},
            {"layer_T": i + 1, "layer_S": i + 1, "feature": "hidden", "loss": "cos", "weight": 1},
        ]
    config = {"temperature": 4, "intermediate_matches": matches}
    return outputs(False), outputs(True), batch, config


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], torch.Tensor], device: str) -> tuple[float, float]:
    sync(device)
    start = time.perf_counter()
    loss = fn()
    sync(device)
    return time.perf_counter() - start, float(loss)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=11, help="timed runs of each (>= 9)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "step_loss_heavy.json"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler tables of one step of each")
    args = parser.parse_args(argv)

    size = {"batch": 16, "length": 128, "heads": 12, "width": 768, "layers": 4, "classes": 3}
    if args.small:
        size = {"batch": 2, "length": 8, "heads": 2, "width": 16, "layers": 2, "classes": 3}
    teacher, student, batch, config = build(size, args.device)

    # the defaults (compile="auto"): this loss path dominates the step, so it gets compiled
    step = purekd.make_step(config, teacher, student, adaptor, adaptor)
    distiller = textbrewer.GeneralDistiller(
        textbrewer.TrainingConfig(device=args.device, output_dir=tempfile.mkdtemp()),
        textbrewer.DistillationConfig(**config), teacher, student, adaptor, adaptor)

    # the pre-made adapted outputs / dicts for the loss path alone
    adapted = step.outputs(batch)
    ctx = make_context(0.0, device=args.device)
    with torch.no_grad():
        results_T = post_adaptor(adaptor(batch, teacher(*batch)))
    results_S = post_adaptor(adaptor(batch, student(*batch)))

    def purekd_step() -> torch.Tensor:
        loss = step(batch).loss
        loss.backward()
        return loss.detach()

    def textbrewer_step() -> torch.Tensor:
        loss, _ = distiller.train_on_batch(batch, {})
        loss.backward()
        return loss.detach()

    def purekd_loss_path() -> torch.Tensor:
        loss = step.loss(adapted.student, adapted.teacher, ctx).loss
        loss.backward()
        return loss.detach()

    def textbrewer_loss_path() -> torch.Tensor:
        loss, _ = distiller.compute_loss(results_S, results_T)
        loss.backward()
        return loss.detach()

    cases = {
        "step": (purekd_step, textbrewer_step),
        "loss_path": (purekd_loss_path, textbrewer_loss_path),
    }
    compile_start = time.perf_counter()
    warmed = 0
    while warmed < args.warmup or step.loss.deciding:  # "auto" measures its first steps
        for ours, theirs in cases.values():
            ours(), theirs()
            student.zero_grad(set_to_none=True)
        warmed += 1
    for ours, _ in cases.values():  # the first compiled calls, after the decision
        ours()
        student.zero_grad(set_to_none=True)
    warmup_s = time.perf_counter() - compile_start
    if not step.loss.is_compiled:
        print(f"warning: purekd ran eagerly ({step.loss.fallback_reason})", file=sys.stderr)

    times: dict[str, dict[str, list[float]]] = {k: {"purekd": [], "textbrewer": []} for k in cases}
    losses: dict[str, dict[str, float]] = {}
    for _ in range(max(args.runs, 1)):
        for name, (ours, theirs) in cases.items():  # interleaved: load drifts hit both alike
            for label, fn in (("purekd", ours), ("textbrewer", theirs)):
                seconds, value = timed(fn, args.device)
                student.zero_grad(set_to_none=True)
                times[name][label].append(seconds)
                losses.setdefault(name, {})[label] = value

    results: dict[str, Any] = {}
    for name in cases:
        ours = statistics.median(times[name]["purekd"])
        theirs = statistics.median(times[name]["textbrewer"])
        agree = abs(losses[name]["purekd"] - losses[name]["textbrewer"]) <= 1e-4 * max(
            1.0, abs(losses[name]["textbrewer"]))
        results[name] = {
            "purekd_median_s": ours, "textbrewer_median_s": theirs, "ratio": ours / theirs,
            "target_ratio": TARGETS[name], "target_met": ours / theirs <= TARGETS[name],
            "loss_purekd": losses[name]["purekd"], "loss_textbrewer": losses[name]["textbrewer"],
            "losses_agree": agree, "runs_s": times[name],
        }

    print(f"\nloss-heavy step on {args.device}: batch {size['batch']}, length {size['length']}, "
          f"{size['heads']} heads, width {size['width']}, {size['layers']} layers x "
          f"(attention_ce + hidden_mse + cos), masked, + logits KD; "
          f"median of {args.runs} runs, forward + backward; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; warm-up {warmup_s:.1f} s\n")
    print(f"purekd's compile decision: {step.loss.decision}")
    print(f"{'':<18}{'purekd (ms)':>12}{'TextBrewer (ms)':>17}{'ratio':>8}{'target':>8}"
          f"{'loss purekd':>14}{'loss TB':>14}")
    for name, r in results.items():
        print(f"{name:<18}{1e3 * r['purekd_median_s']:>12.2f}{1e3 * r['textbrewer_median_s']:>17.2f}"
              f"{r['ratio']:>7.2f}x{'<=' + str(r['target_ratio']):>8}"
              f"{r['loss_purekd']:>14.6f}{r['loss_textbrewer']:>14.6f}"
              + ("" if r["losses_agree"] else "   LOSSES DIFFER"))

    report = {
        "benchmark": "step_loss_heavy", "size": size, "config": config, "device": args.device,
        "runs": args.runs, "warmup": args.warmup, "warmup_s": warmup_s,
        "torch": torch.__version__, "textbrewer": textbrewer.__version__,
        "purekd": purekd.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "compiled": step.loss.is_compiled, "compile_decision": step.loss.decision,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if args.device.startswith("cuda"):
            activities.append(ProfilerActivity.CUDA)
        for name, (ours, theirs) in cases.items():
            for label, fn in (("purekd", ours), ("textbrewer", theirs)):
                with profile(activities=activities) as prof:
                    fn()
                student.zero_grad(set_to_none=True)
                print(f"\n=== profile: {name} / {label} ===")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    if not all(r["losses_agree"] for r in results.values()):
        raise SystemExit("purekd's and TextBrewer's losses differ")
    return report


if __name__ == "__main__":
    main()
