"""The step embedded in foreign training loops (examples/foreign_loops/): each loop trains the
student and the projections, the loss falls, and — same SGD, same batches in the same order,
same progress — every loop ends with the plain PyTorch loop's weights."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # Lightning's

FOREIGN_LOOPS = Path(__file__).resolve().parents[2] / "examples" / "foreign_loops"
STEPS = 24


def example(name: str) -> ModuleType:
    """Import ``examples/foreign_loops/<name>.py`` (its folder on ``sys.path``, as when run)."""
    if str(FOREIGN_LOOPS) not in sys.path:
        sys.path.insert(0, str(FOREIGN_LOOPS))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def plain() -> Any:
    return example("plain_pytorch").main(steps=STEPS)


def assert_trained(result: Any) -> None:
    assert len(result.train_losses) == STEPS
    assert all(torch.isfinite(torch.tensor(result.train_losses)))
    assert result.loss_after < 0.95 * result.loss_before


def assert_same_weights(result: Any, reference: Any) -> None:
    for actual, expected in ((result.student_state, reference.student_state),
                             (result.projection_state, reference.projection_state)):
        assert actual.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=0, msg=key)


def test_plain_loop_trains_student_and_projection(plain: Any) -> None:
    assert_trained(plain)
    start = example("toy_setup").build(0).step
    assert not torch.equal(start.projections[0].weight, plain.projection_state["0.weight"])
    assert not torch.equal(start.student.hidden.weight, plain.student_state["hidden.weight"])


def test_plain_loop_is_deterministic(plain: Any) -> None:
    assert_same_weights(example("plain_pytorch").main(steps=STEPS), plain)


def test_hf_trainer_compute_loss(plain: Any, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    result = example("hf_trainer").main(steps=STEPS, output_dir=str(tmp_path))
    assert_trained(result)
    assert_same_weights(result, plain)
    assert result.train_losses == pytest.approx(plain.train_losses, abs=1e-5)


def test_lightning_training_step(plain: Any) -> None:
    pytest.importorskip("lightning")
    result = example("lightning_module").main(steps=STEPS)
    assert_trained(result)
    assert_same_weights(result, plain)
    assert result.train_losses == pytest.approx(plain.train_losses, abs=1e-5)


def test_accelerate_loop(plain: Any) -> None:
    pytest.importorskip("accelerate")
    result = example("accelerate_loop").main(steps=STEPS)
    assert_trained(result)
    assert_same_weights(result, plain)
    assert result.train_losses == pytest.approx(plain.train_losses, abs=1e-5)
