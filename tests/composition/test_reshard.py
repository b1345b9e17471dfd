"""A sharded (FSDP2) state resumes on another number of processes (``_reshard.py``, gloo):
``torch.distributed.checkpoint`` reshards the student's and AdamW's tensors on load, and the run
ends with the weights of the uninterrupted run — 2 → 1 and 1 → 2 processes, with the fused
output layer over tied embeddings. Float sums over the ranks run in another order, amplified by
AdamW's normalisation: ``ATOL`` = 1e-5 (measured: see the test). A resume that changes the global
batch is refused, naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from .._torchrun import torchrun

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is unavailable")

from . import _reshard as worker  # noqa: E402  (needs transformers)

ATOL = 1e-5


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("reshard")
    for phase, processes in (("two", 2), ("one", 1), ("two-again", 2)):
        torchrun(Path(worker.__file__), str(work), phase, processes=processes, timeout=400,
                 stderr_tail=5000)
    return work


def _assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert got.keys() == expected.keys()
    worst = 0.0
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=ATOL, rtol=0,
                                   msg=lambda m, k=key: f"{k}: {m}")
        worst = max(worst, (got[key] - value).abs().max().item())
    return worst


def test_a_state_of_two_processes_resumes_on_one(work: Path) -> None:
    _assert_close(torch.load(work / "two-to-one.pt"), torch.load(work / "two.pt"))


def test_a_state_of_one_process_resumes_on_two(work: Path) -> None:
    _assert_close(torch.load(work / "one-to-two.pt"), torch.load(work / "one.pt"))


def test_both_process_counts_train_alike(work: Path) -> None:
    _assert_close(torch.load(work / "one.pt"), torch.load(work / "two.pt"))


def test_a_resume_that_changes_the_global_batch_is_refused_naming_it(work: Path) -> None:
    message = (work / "refused.txt").read_text()
    assert "the state belongs to a different run" in message
    assert "global_batch_size: 8 -> 4" in message
    assert not (work / "refused.pt").exists()
