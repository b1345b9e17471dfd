"""``purekd demo``: train a teacher, then distil it into a small student that sees few labels,
beside the same student trained on those labels alone."""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import purekd
from purekd.runner._sinks import is_term

from . import _digits as digits

TEACHER_WIDTH, STUDENT_WIDTH = 256, 16


class Result(NamedTuple):
    name: str
    parameters: int
    accuracy: float
    ms_per_batch: float
    curve: Path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def inference_ms(model: nn.Module, x: torch.Tensor, repeats: int = 50) -> float:
    """Median milliseconds for one forward pass over ``x`` (eval mode, no autograd)."""
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(5):
            model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def _loader(data: digits.Rows, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=len(data) > batch_size,
                      generator=torch.Generator().manual_seed(seed))


def _train_supervised(model: nn.Module, data: digits.Rows, epochs: int, out: Path,
                      lr: float, batch_size: int, seed: int) -> None:
    trainer = purekd.BasicTrainer(
        purekd.TrainingConfig(output_dir=str(out), device="cpu", ckpt_epoch_frequency=epochs),
        model, digits.adaptor)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with trainer:
        trainer.train(optimizer, _loader(data, batch_size, seed), num_epochs=epochs,
                      progress_bar=True)


def _distil(teacher: nn.Module, student: nn.Module, data: digits.Rows, epochs: int, out: Path,
            lr: float, batch_size: int, seed: int, compile: bool) -> None:
    distill_config = purekd.DistillationConfig(
        temperature=4, kd_loss_weight=16, hard_label_weight=1,
        intermediate_matches=[{"layer_T": 0, "layer_S": 0, "feature": "hidden",
                               "loss": "hidden_mse", "weight": 1,
                               "proj": ["linear", STUDENT_WIDTH, TEACHER_WIDTH]}])
    distiller = purekd.GeneralDistiller(
        purekd.TrainingConfig(output_dir=str(out), device="cpu", ckpt_epoch_frequency=epochs),
        distill_config, teacher, student, digits.adaptor, digits.adaptor, compile=compile)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    with distiller:
        distiller.train(optimizer, _loader(data, batch_size, seed), num_epochs=epochs,
                        progress_bar=True)


def run(output_dir: str | Path = "purekd-demo", num_labels: int = 50, teacher_epochs: int = 20,
        student_epochs: int = 40, seed: int = 0, compile: bool = False,
        plot: bool = True) -> list[Result]:
    """Run the demo; write loss curves, a PNG and ``results.json`` under ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    data = digits.load(num_labels, seed)
    everyone = torch.ones_like(data.labelled)
    print(f"digits: {len(data.x_train)} training images ({int(data.labelled.sum())} labelled for "
          f"the students), {len(data.x_test)} test images")

    print("1/3 teacher: supervised on every training label")
    teacher = digits.MLP(TEACHER_WIDTH, dropout=0.1)
    _train_supervised(teacher, digits.Rows(data.x_train, data.y_train, everyone),
                      teacher_epochs, out / "teacher", lr=1e-3, batch_size=64, seed=seed)

    initial_student = digits.MLP(STUDENT_WIDTH)
    print(f"2/3 student on its {int(data.labelled.sum())} labels alone")
    label_only = copy.deepcopy(initial_student)
    keep = data.labelled
    few = digits.Rows(data.x_train[keep], data.y_train[keep], everyone[keep])
    steps_per_epoch = max(1, len(data.x_train) // 64)
    label_epochs = max(1, student_epochs * steps_per_epoch // max(1, len(few) // 16))
    _train_supervised(label_only, few, label_epochs, out / "label_only", lr=3e-3,
                      batch_size=16, seed=seed)

    print("3/3 student distilled from the teacher on every training image (labels where known)")
    distilled = copy.deepcopy(initial_student)
    _distil(teacher, distilled, digits.Rows(data.x_train, data.y_train, data.labelled),
            student_epochs, out / "distilled", lr=3e-3, batch_size=64, seed=seed, compile=compile)

    batch = data.x_test[:256]
    results = [
        Result(name, digits.parameter_count(model), digits.accuracy(model, data.x_test, data.y_test),
               inference_ms(model, batch), out / folder / "metrics.jsonl")
        for name, model, folder in (("teacher", teacher, "teacher"),
                                    ("student, labels only", label_only, "label_only"),
                                    ("student, distilled", distilled, "distilled"))
    ]
    print()
    print(table(results, len(batch)))
    (out / "results.json").write_text(json.dumps([
        {"model": r.name, "parameters": r.parameters, "test_accuracy": r.accuracy,
         "ms_per_batch": r.ms_per_batch} for r in results], indent=2))
    if plot:
        png = plot_curves(results, out / "loss_curves.png")
        print(f"\nloss curves: {png}")
    return results


def table(results: list[Result], batch_size: int) -> str:
    header = f"{'model':<22} {'parameters':>10} {'test accuracy':>14} {f'ms / batch of {batch_size}':>18}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.name:<22} {r.parameters:>10,} {r.accuracy:>13.1%} {r.ms_per_batch:>18.3f}")
    return "\n".join(lines)


def _curves(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Per-micro-batch series from a run's ``metrics.jsonl``: ``loss`` and each term."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for line in path.read_text().splitlines():
        record: dict[str, Any] = json.loads(line)
        for key, value in record.items():
            if key == "loss" or is_term(key):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(value)
    return series


def _smoothed(axes: Any, steps: list[int], values: list[float], label: str) -> None:
    window = max(1, len(values) // 50)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    axes.plot(steps[window - 1:], smooth, label=label)


def plot_curves(results: list[Result], path: Path) -> Path:
    """Left: each run's training objective. Right: the distilled student's terms, unweighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        steps, losses = _curves(r.curve)["loss"]
        _smoothed(left, steps, losses, r.name)
    left.set_title("training objective")
    for name, (steps, values) in _curves(results[-1].curve).items():
        if name != "loss":
            _smoothed(right, steps, values, name)
    right.set_title(f"{results[-1].name}: unweighted terms")
    for axes in (left, right):
        axes.set_xlabel("micro-batch")
        axes.set_yscale("log")
        axes.legend(fontsize="small")
    left.set_ylabel("loss (smoothed)")
    figure.suptitle("purekd demo: handwritten digits")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


__all__ = ["Result", "run", "table"]
