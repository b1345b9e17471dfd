"""TextBrewer's random-tokens example, migrated to purekd by its import lines
(examples/random_tokens/distill.py), gives TextBrewer's student weights and prints the same
parameter tables (``textbrewer.utils.display_parameters`` -> ``purekd.utils``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "random_tokens" / "distill.py"
TINY = {"layers_T": 8, "layers_S": 3, "hidden": 32, "samples": 24, "length": 16,
        "batch_size": 8, "num_epochs": 2}


def load() -> Any:
    spec = importlib.util.spec_from_file_location("random_tokens_distill", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tables(printed: str) -> str:
    return printed.split("train_config:")[0]


def test_the_migrated_example_gives_textbrewers_weights():
    example = load()
    ours = example.main("purekd", **TINY)
    theirs = example.main("textbrewer", **TINY)
    assert ours["student"].keys() == theirs["student"].keys()
    start = ours["initial_student"]
    moved = 0
    for key, expected in theirs["student"].items():
        torch.testing.assert_close(ours["student"][key], expected, atol=2e-6, rtol=0, msg=key)
        moved += not torch.equal(start[key], expected)
    assert moved > 10  # training changed the weights
    assert tables(ours["printed"]) == tables(theirs["printed"])
    assert "LAYER NAME" in ours["printed"] and "#PARAMS" in ours["printed"]
    assert ours["accuracies"] == pytest.approx(theirs["accuracies"])
    assert len(ours["accuracies"]) == TINY["num_epochs"]
