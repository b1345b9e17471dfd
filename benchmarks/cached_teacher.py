"""Epochs on a cached teacher cost what training the student alone costs.

With ``is_caching_logits=True`` purekd (like TextBrewer) runs the teacher once over the data and
then trains every epoch from the cached logits. This benchmark times those epochs against a
hand-written student-only loop (forward, its own hard-label loss, backward, SGD) on the same
batches: the KD loss on cached logits should add almost nothing. The caching pass is excluded
by timing ``num_epochs=1 + E`` minus ``num_epochs=1`` (both include one caching pass).

Student: BERT 2 layers x 128, batch 16 x 128 tokens. Target: <= 1.05x.

    python -m benchmarks.cached_teacher [--batches 6] [--epochs 3] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from typing import Any

import torch

from benchmarks._common import device, synchronize, write
from benchmarks.bert_end_to_end import TEMPERATURE, Wrapped, adaptor, batches, bert

TARGET = 1.05


def run(num_batches: int = 6, epochs: int = 3, repeats: int = 3) -> dict[str, Any]:
    import purekd

    torch.manual_seed(0)
    teacher = Wrapped(bert(6, 256, 4)).eval()
    student0 = Wrapped(bert(2, 128, 2))
    data = batches(num_batches)
    lr = 1e-3

    def distil(num_epochs: int) -> float:
        student = copy.deepcopy(student0)
        distiller = purekd.BasicDistiller(
            purekd.TrainingConfig(device=str(device()), output_dir=tempfile.mkdtemp(),
                                  ckpt_epoch_frequency=1000),
            purekd.DistillationConfig(temperature=TEMPERATURE, hard_label_weight=1,
                                      is_caching_logits=True),
            teacher, student, adaptor, adaptor, compile=False)
        start = time.perf_counter()
        with distiller:
            distiller.train(torch.optim.SGD(student.parameters(), lr=lr), data,
                            num_epochs=num_epochs)
        synchronize()
        return time.perf_counter() - start

    def student_only(num_epochs: int) -> float:
        student = copy.deepcopy(student0).train()
        optimizer = torch.optim.SGD(student.parameters(), lr=lr)
        start = time.perf_counter()
        for _ in range(num_epochs):
            for ids, mask, labels in data:
                student(ids, mask, labels).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        synchronize()
        return time.perf_counter() - start

    distil(1)
    student_only(1)  # warm-up
    cached, alone = [], []
    for _ in range(repeats):
        cached.append(distil(1 + epochs) - distil(1))
        alone.append(student_only(epochs))
    per_epoch_cached = statistics.median(cached) / epochs
    per_epoch_alone = statistics.median(alone) / epochs
    return {"batches": num_batches, "epochs": epochs,
            "cached_epoch_s": per_epoch_cached, "student_only_epoch_s": per_epoch_alone,
            "ratio": per_epoch_cached / per_epoch_alone, "target": TARGET}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    result = run(args.batches, args.epochs, args.repeats)
    print(json.dumps(result, indent=2))
    write("cached_teacher", result, args.out)


if __name__ == "__main__":
    main()
