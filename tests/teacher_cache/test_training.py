"""Training from the cache: with k = V (float32 values) a GeneralDistiller trained on the cached
teacher ends with the weights of one trained with the live teacher, with no teacher model at
all; a run interrupted and resumed by the runner reads the right rows for the replayed shuffle."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import purekd
from purekd.teacher_cache import CachedCollate, CachedTeacherDataset, TeacherCache
from tests.runner._helpers import Stop, assert_state_equal, stop_at

from ._helpers import VOCAB, Tokens, live_adaptor, llama, pad, write

DISTILL = {"temperature": 2.0, "kd_loss_type": "ce"}
EPOCHS, BATCH = 2, 4


def dense_adaptor(batch: Any, cached: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The cached top-k scattered back to dense log-probabilities (exact when k = V)."""
    ids, logprobs = cached["topk_ids"], cached["topk_logprobs"]
    dense = torch.zeros(*ids.shape[:-1], VOCAB).scatter(-1, ids, logprobs)
    return {"logits": dense, "logits_mask": cached["topk_mask"]}


def student_adaptor(batch: Any, outputs: Any) -> dict[str, Any]:
    return {"logits": outputs.logits, "logits_mask": batch["attention_mask"]}


def loader(dataset: Any, collate: Any, seed: int = 3) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[torch.nn.Module, torch.nn.Module, Tokens, Path]:
    teacher, student = llama(seed=0), llama(seed=1, hidden=16, layers=1)
    data = Tokens(16, seed=1)
    out = tmp_path_factory.mktemp("kv")
    write(teacher, data, out, k=VOCAB, values="float32", shuffle=True, shard_samples=5)
    return teacher, student, data, out


def _train(model_T: Any, adaptor_T: Any, student: torch.nn.Module, data: DataLoader, out: Path,
           **train_options: Any) -> torch.nn.Module:
    distiller = purekd.GeneralDistiller(
        purekd.TrainingConfig(device="cpu", output_dir=str(out), ckpt_frequency=2), DISTILL,
        model_T, student, adaptor_T, student_adaptor, compile=False)
    with distiller:
        distiller.train(torch.optim.Adam(student.parameters(), lr=1e-2), data,
                        num_epochs=EPOCHS, **train_options)
    return student


def test_cache_with_k_equal_v_trains_like_the_live_teacher(setup, tmp_path) -> None:
    teacher, student0, data, cache_dir = setup
    live = _train(teacher, live_adaptor, copy.deepcopy(student0), loader(data, pad),
                  tmp_path / "live")
    dataset = CachedTeacherDataset(data, TeacherCache(cache_dir, vocab_size=VOCAB))
    cached = _train(None, dense_adaptor, copy.deepcopy(student0),
                    loader(dataset, CachedCollate(pad)), tmp_path / "cached")
    moved = any(not torch.equal(a, b) for a, b in
                zip(live.state_dict().values(), student0.state_dict().values(), strict=True))
    assert moved
    for (name, a), b in zip(live.state_dict().items(), cached.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_resumed_run_reads_the_rows_of_the_replayed_order(setup, tmp_path) -> None:
    _, student0, data, cache_dir = setup
    dataset = CachedTeacherDataset(data, TeacherCache(cache_dir))
    full = _train(None, dense_adaptor, copy.deepcopy(student0),
                  loader(dataset, CachedCollate(pad)), tmp_path / "full", save_state=True)
    out = tmp_path / "cut"
    with pytest.raises(Stop):  # stopped at step 6 of 8 (second epoch), resumed from step 4
        _train(None, dense_adaptor, copy.deepcopy(student0), loader(dataset, CachedCollate(pad)),
               out, save_state=True, callback=stop_at(6))
    torch.manual_seed(1234)  # other generators: the state restores them
    resumed = _train(None, dense_adaptor, llama(seed=7, hidden=16, layers=1),
                     loader(dataset, CachedCollate(pad)), out, save_state=True,
                     resume_from=out / "gs4.state.pt")
    assert_state_equal(resumed.state_dict(), full.state_dict())


def test_make_step_in_a_plain_loop_gives_the_live_teachers_loss(setup) -> None:
    teacher, student, data, cache_dir = setup
    live_step = purekd.make_step(DISTILL, teacher, student, live_adaptor, student_adaptor,
                                 compile=False)
    cached_step = purekd.make_step(DISTILL, None, student, dense_adaptor, student_adaptor,
                                   compile=False)
    dataset = CachedTeacherDataset(data, TeacherCache(cache_dir))
    cached_batches = loader(dataset, CachedCollate(pad), seed=11)
    live_batches = loader(data, pad, seed=11)
    for cached_batch, live_batch in zip(cached_batches, live_batches, strict=True):
        assert torch.equal(cached_batch["student"]["input_ids"], live_batch["input_ids"])
        live, cached = live_step(live_batch), cached_step(cached_batch)
        torch.testing.assert_close(cached.loss, live.loss, atol=1e-6, rtol=1e-5)
        grads = torch.autograd.grad(cached.loss, list(student.parameters()))
        expected = torch.autograd.grad(live.loss, list(student.parameters()))
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)



def test_top_k_teacher_adaptor_gives_the_live_teachers_loss(setup) -> None:
    """The cached dict is a top-k teacher's adaptor output as it is (``topk_ids``,
    ``topk_logprobs``, ``topk_mask``): make_step's token-level KD term dispatches to
    ``topk_kl``, which with k = V equals the dense forward KL of the live teacher.

    (make_step in a plain loop; the distillers take the same adaptor, as the recipe path and
    the LM demo do.)"""
    teacher, student, data, cache_dir = setup
    config = {"temperature": 1.0, "kd_loss_type": "forward_kl"}
    live_step = purekd.make_step(config, teacher, student, live_adaptor, student_adaptor,
                                 compile=False)
    cached_step = purekd.make_step(config, None, student, lambda batch, cache: dict(cache),
                                   student_adaptor, compile=False)
    dataset = CachedTeacherDataset(data, TeacherCache(cache_dir, vocab_size=VOCAB))
    for cached_batch, live_batch in zip(loader(dataset, CachedCollate(pad), seed=2),
                                        loader(data, pad, seed=2), strict=True):
        live, cached = live_step(live_batch), cached_step(cached_batch)
        torch.testing.assert_close(cached.loss, live.loss, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(cached.loss, list(student.parameters()))
        expected = torch.autograd.grad(live.loss, list(student.parameters()))
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
