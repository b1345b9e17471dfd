"""FSDP2 on two CPU processes (gloo), in one torchrun launch (``_fsdp_worker.py``):

* a Llama student distilled from a Llama teacher (both sharded; a projection between their
  widths, AdamW, StepLR, clipping, accumulation, a shuffling DistributedSampler) ends with the
  weights of one process training on the combined batch, within ``ATOL`` = 1e-4 (float32 sums
  in another order, amplified by AdamW's normalisation where gradients are near zero: measured
  at most 2.2e-5 after six steps at lr 1e-2, where weights move by up to 6e-2), and the
  callback's logits within ``LOGITS_ATOL`` = 2e-4 (measured 4.6e-5);
* only rank 0 writes ``gs*.pkl``, which hold the whole student under its unsharded names;
* a run whose two ranks are SIGKILLed while writing a state, restarted by torchrun and
  resumed, ends with exactly the weights of the uninterrupted run;
* each rank holds half of the student's parameters;
* the callback gets the sharded student on every rank and can evaluate it;
* with token-count normalisation, the gradient is that of one batch of every kept token of both
  ranks (float64, to 1e-12).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import purekd
from purekd.runner._metrics import read_metrics

from .._torchrun import torchrun
from ._helpers import assert_state_equal

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is unavailable")

from . import _fsdp_worker as worker  # noqa: E402  (needs transformers)

ATOL, LOGITS_ATOL = 1e-4, 2e-4


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    """One torchrun launch of two processes with one restart; the work directory and what each
    run's ranks reported."""
    work = tmp_path_factory.mktemp("fsdp")
    torchrun(Path(worker.__file__), str(work), launcher=("--max-restarts=1",), timeout=400,
             stderr_tail=5000)
    reports = {name: [torch.load(work / f"{name}.rank{r}.pt", weights_only=True) for r in (0, 1)]
               for name in ("full", "resumed")}
    return work, reports


def _one_process(out: Path) -> tuple[dict[str, torch.Tensor], worker.Recorder]:
    config = purekd.TrainingConfig(device="cpu", output_dir=str(out),
                                   gradient_accumulation_steps=worker.ACCUMULATION,
                                   ckpt_frequency=worker.STEPS_PER_EPOCH)
    distiller, student = worker.distiller(config)
    data = worker.dataset()
    loader = DataLoader(data, batch_size=worker.WORLD * worker.PER_RANK_BATCH,
                        sampler=worker.EpochPermutations(len(data), worker.SHUFFLE_SEED))
    callback = worker.Recorder()
    worker.train(distiller, student, loader, callback)
    return distiller.step.state_dict(), callback


def test_two_sharded_processes_equal_one_process_on_the_combined_batch(launch, tmp_path) -> None:
    _, reports = launch
    full = reports["full"]
    expected, callback = _one_process(tmp_path / "one")
    got = full[0]["weights"]
    assert got.keys() == expected.keys()  # student.* and projections.0.*
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=ATOL, rtol=0,
                                   msg=lambda m, k=key: f"{k}: {m}")
    assert full[1]["weights"] == {}  # gathered to rank 0 only

    # the callback: every rank, every checkpoint, the sharded student, which it can evaluate
    for rank in full:
        assert rank["steps"] == worker.CKPT_STEPS == callback.steps
        assert set(rank["kinds"]) == {"FSDPLlamaForCausalLM"}
        torch.testing.assert_close(rank["logits"], callback.logits, atol=LOGITS_ATOL, rtol=0)


def test_the_logged_gradient_norm_is_that_of_one_process(launch, tmp_path) -> None:
    """The norm of the sharded gradient (a DTensor's, reduced over both ranks) in rank 0's
    records equals one process's on the combined batch, step by step; so do the learning
    rates (StepLR)."""
    work, _ = launch
    _one_process(tmp_path / "one")
    sharded, one = (read_metrics(d / "metrics.jsonl") for d in (work / "full", tmp_path / "one"))
    norms = [(r["global_step"], r["grad_norm"]) for r in sharded if "grad_norm" in r]
    expected = [(r["global_step"], r["grad_norm"]) for r in one if "grad_norm" in r]
    assert [s for s, _ in norms] == [s for s, _ in expected] == list(range(len(expected)))
    assert [n for _, n in norms] == pytest.approx([n for _, n in expected], rel=1e-4)
    assert [(r["global_step"], r["lr"]) for r in sharded] == [
        (r["global_step"], r["lr"]) for r in one]


def test_only_rank_0_writes_the_gathered_student(launch) -> None:
    work, reports = launch
    full = reports["full"]
    names = [f"gs{s}.pkl" for s in worker.CKPT_STEPS]
    assert full[0]["saves"] == names and full[1]["saves"] == []
    assert sorted(p.name for p in (work / "full").iterdir()) == sorted(
        [*names, *(f"gs{s}.state" for s in worker.CKPT_STEPS), "metrics.jsonl", "run.json"])
    # a plain, unsharded student loads the last one, and it is the trained student
    _, student = worker.models()
    final = torch.load(work / "full" / names[-1], weights_only=True)
    student.load_state_dict(final)
    assert_state_equal(final, {k[len("student."):]: v for k, v in full[0]["weights"].items()
                               if k.startswith("student.")})


def test_a_sigkilled_run_resumes_to_the_uninterrupted_weights(launch) -> None:
    work, reports = launch
    resumed, full = reports["resumed"], reports["full"]
    # killed while writing the state of KILL_AT: its shards are in a temporary directory that
    # was never renamed into place, and the run resumed from KILL_AT - 1
    left = (work / "after_kill.txt").read_text().split()
    assert f".gs{worker.KILL_AT}.state.tmp" in left and f"gs{worker.KILL_AT}.state" not in left
    assert f"gs{worker.KILL_AT - 1}.state" in left
    assert resumed[0]["steps"] == worker.CKPT_STEPS[worker.KILL_AT - 1:]
    assert_state_equal(resumed[0]["weights"], full[0]["weights"])
    assert torch.equal(resumed[0]["logits"], full[0]["logits"])
    killed = work / "killed"
    assert not any(p.name.endswith(".tmp") for p in killed.iterdir())  # cleaned up by the rerun
    for step in worker.CKPT_STEPS:
        assert_state_equal(torch.load(killed / f"gs{step}.pkl", weights_only=True),
                           torch.load(work / "full" / f"gs{step}.pkl", weights_only=True))


def test_each_rank_holds_half_of_the_student(launch) -> None:
    _, reports = launch
    for rank in reports["full"]:
        assert rank["world"] == 2
        assert rank["numel"] == sum(p.numel() for p in worker.models()[1].parameters())
        assert abs(rank["local_numel"] - rank["numel"] / 2) <= 0.01 * rank["numel"]


def test_token_normalisation_counts_the_tokens_of_both_sharded_ranks(launch) -> None:
    work, _ = launch
    if not worker.token_normalisation_available():
        pytest.skip("this purekd has no token-count normalisation (loss_normalisation)")
    teacher, student = worker.TokenLM(7, seed=0), worker.TokenLM(4, seed=1)
    x, mask = worker.token_batches(worker.token_samples(), len(worker.TOKEN_KEPT))[0]
    with torch.no_grad():
        p_T = torch.softmax(teacher.body(x), -1)
    rows = (p_T * (p_T.log() - torch.log_softmax(student.body(x), -1))).sum(-1)
    rows[mask.bool()].mean().backward()  # forward KL over every kept token, by hand
    expected = {k: p.detach() - worker.TOKEN_LR * p.grad for k, p in student.named_parameters()}
    got = torch.load(work / "tokens.rank0.pt", weights_only=True)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-12, rtol=0)
