"""TextBrewer's random-tokens example end to end: purekd (the migrated example, with the defaults
and with ``compile=True`` / ``False``) against TextBrewer 0.2.1 running the same script.

Each run is a fresh process (``examples/random_tokens/distill.py``: build a 12-layer teacher and
a 3-layer student, width 128, 100 random sequences of 128 tokens, 10 epochs of batch 32 = 40
steps, with ``display_parameters`` and an evaluation callback each epoch), timed from model
construction to the end of training — what a user waits for, compilation included. Variants
are interleaved over ``--repeats`` rounds; medians.

Target: purekd with the defaults <= 1.00x TextBrewer.

    python -m benchmarks.random_tokens [--repeats 3] [--epochs 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks._common import write

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"default_vs_textbrewer": 1.00}
VARIANTS = {"purekd_default": ("purekd", None), "purekd_compiled": ("purekd", True),
            "purekd_eager": ("purekd", False), "textbrewer": ("textbrewer", None)}

_CHILD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("distill", {path!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
run = module.main({backend!r}, {compile!r}, num_epochs={epochs})
print(json.dumps({{"seconds": run["seconds"], "decision": run["decision"],
                  "compiled": run["compiled"]}}))
"""


def one(backend: str, compile: Any, epochs: int) -> dict[str, Any]:
    code = _CHILD.format(path=str(ROOT / "examples" / "random_tokens" / "distill.py"),
                         backend=backend, compile=compile, epochs=epochs)
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True, cwd=ROOT)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run(repeats: int = 3, epochs: int = 10) -> dict[str, Any]:
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    decisions: dict[str, Any] = {}
    order = list(VARIANTS.items())
    for _ in range(repeats):
        order = order[1:] + order[:1]  # rotate: nobody always runs first
        for name, (backend, compile) in order:
            result = one(backend, compile, epochs)
            times[name].append(result["seconds"])
            decisions[name] = result["decision"]
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "epochs": epochs, "repeats": repeats, "runs_s": times,
        **{f"{name}_s": value for name, value in medians.items()},
        "default_vs_textbrewer": medians["purekd_default"] / medians["textbrewer"],
        "compiled_vs_textbrewer": medians["purekd_compiled"] / medians["textbrewer"],
        "eager_vs_textbrewer": medians["purekd_eager"] / medians["textbrewer"],
        "default_compile_decision": decisions["purekd_default"],
        "targets": TARGETS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out")
    args = parser.parse_args()
    result = run(args.repeats, args.epochs)
    print(json.dumps(result, indent=2))
    write("random_tokens", result, args.out)


if __name__ == "__main__":
    main()
