"""Cross-tokenizer distillation on two processes (gloo, one torchrun launch of
``_cross_tokenizer_worker.py``), under DistributedDataParallel and under FSDP2 (``blocks=
("Linear",)``; the live teacher sharded, the cache's run with ``teacher="none"``):
``kd_loss_type`` ``"uld"`` and ``"gold"``, from the live teacher and from a cross-tokenizer
top-k cache (``k = 4 < V_T``: GOLD's uniform tail and ULD's tail mass in play).

Each rank's two micro-batches (accumulation 2) hold one text each, every one with another count
of aligned spans; the losses are token-normalised over the aligned spans, so two optimizer steps
on two processes must equal two steps of one process on the combined batches (the four texts of
a step in one batch, no accumulation): SGD on the loss averaged over every span of the step.
float64 models, so the only difference is the order of float sums: asserted to 1e-10 (measured
below 1e-15). The reference would differ (by far more than that) if the spans were averaged per
micro-batch or per rank instead: a test checks that too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .._torchrun import torchrun
from . import _cross_tokenizer_worker as worker

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is unavailable")

TEXTS = ["in the beginning god created the heaven and the earth.", "let there be light.",
         "and the earth.", "the heaven and the new york cafe.",
         "god created light.", "and god said let there be light and there was light.",
         "the earth.", "in the beginning."]
CASES = {("uld", "live"): {}, ("gold", "live"): {"beta": 0.9},
         ("uld", "cache"): {"top_k": 3}, ("gold", "cache"): {}}
K, ATOL = 4, 1e-10


def _pair() -> tuple[Any, Any]:
    from ..stages import _tokenizers
    from ..stages.test_cross_batches import characters

    return _tokenizers.wordpiece(), characters()


def _per_step(collate: Any, items: list[Any]) -> tuple[list[list[Any]], list[Any]]:
    """Each rank's micro-batches (one item each, in step order) and the one-process batches
    (the four items of a step together)."""
    per = worker.WORLD * worker.ACCUMULATION
    ranks: list[list[Any]] = [[] for _ in range(worker.WORLD)]
    for step in range(worker.STEPS):
        for rank in range(worker.WORLD):
            for micro in range(worker.ACCUMULATION):
                ranks[rank].append(collate([items[step * per + rank * worker.ACCUMULATION
                                                  + micro]]))
    combined = [collate(items[step * per:(step + 1) * per]) for step in range(worker.STEPS)]
    return ranks, combined


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from purekd.stages import CrossTokenizerCollator, vocabulary_map
    from purekd.teacher_cache import (
        CrossTokenizerCachedCollate,
        CrossTokenizerCachedDataset,
        TeacherCache,
    )

    from ..teacher_cache.test_cross_tokenizer import write

    work = tmp_path_factory.mktemp("cross_ddp")
    tokenizer_S, tokenizer_T = _pair()
    teacher, _ = worker.models(len(tokenizer_T), len(tokenizer_S))
    write(teacher, (tokenizer_S, tokenizer_T), work / "cache", k=K, texts=TEXTS)
    cache = TeacherCache(work / "cache", student_tokenizer=tokenizer_S)
    data = CrossTokenizerCachedDataset(TEXTS, cache, tokenizer_S)
    sources = {
        "live": _per_step(CrossTokenizerCollator(tokenizer_S, tokenizer_T), TEXTS),
        "cache": _per_step(CrossTokenizerCachedCollate(tokenizer_S),
                           [data[i] for i in range(len(TEXTS))]),
    }
    vmap = vocabulary_map(tokenizer_S, tokenizer_T)
    plan, references = {}, {}
    for placement in ("ddp", "fsdp"):
        for (loss, source), params in CASES.items():
            ranks, combined = sources[source]
            run = {"placement": placement, "loss": loss, "source": source, "params": params,
                   "vocab_T": len(tokenizer_T), "vocab_S": len(tokenizer_S),
                   "vocabulary_map": vmap}
            plan[f"{placement}-{loss}-{source}"] = {**run, "batches": ranks}
            references[f"{loss}-{source}"] = ({**run, "placement": "single"}, combined, ranks)
    torch.save(plan, work / "plan.pt")
    torchrun(Path(worker.__file__), str(work), timeout=240)
    return work, references


def _reference(run: dict[str, Any], batches: list[Any], out: Path) -> dict[str, Any]:
    return worker.train(run, batches, out, world=1)


@pytest.mark.parametrize("placement", ["ddp", "fsdp"])
@pytest.mark.parametrize(("loss", "source"), list(CASES))
def test_two_processes_equal_one_process_on_the_combined_batches(launched, tmp_path, placement,
                                                                 loss, source):
    work, references = launched
    run, combined, _ = references[f"{loss}-{source}"]
    expected = _reference(run, combined, tmp_path)
    got = torch.load(work / f"{placement}-{loss}-{source}.pt", weights_only=True)
    assert got.keys() == expected.keys()
    start = worker.models(run["vocab_T"], run["vocab_S"])[1].state_dict()
    assert max((expected[k] - start[k]).abs().max().item() for k in start) > 1e-3  # it moved
    for key, value in expected.items():
        assert got[key].dtype == value.dtype == torch.float64
        torch.testing.assert_close(got[key], value, atol=ATOL, rtol=0,
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_the_micro_batches_have_unequal_span_counts_so_per_batch_means_differ(launched,
                                                                              tmp_path):
    # the comparison above would not tell token normalisation from averaging per micro-batch
    # if every micro-batch had as many spans: they do not, and that average is another run
    _, references = launched
    run, combined, ranks = references["uld-live"]
    counts = [int(b["spans"].weight.sum()) for rank in ranks for b in rank]
    assert len(set(counts)) >= 4, counts
    expected = _reference(run, combined, tmp_path / "tokens")
    # one process, accumulation 4 with loss_normalisation='batch': the mean of the
    # micro-batches' means
    import purekd
    from purekd.integrations import hf_adaptor

    teacher, student = worker.models(run["vocab_T"], run["vocab_S"])
    distiller = purekd.GeneralDistiller(
        purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path / "batch"),
                              gradient_accumulation_steps=4),
        purekd.DistillationConfig(kd_loss_type=[run["loss"], run["params"]], temperature=1.0,
                                  loss_normalisation="batch"),
        teacher, student, hf_adaptor(causal=True), hf_adaptor(causal=True), compile=False)
    order = [b for step in range(worker.STEPS) for rank in ranks
             for b in rank[2 * step:2 * step + 2]]
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=worker.LR),
                        DataLoader(order, batch_size=None), num_steps=worker.STEPS)
    gap = max((student.state_dict()[k] - v).abs().max().item() for k, v in expected.items())
    assert gap > 1e3 * ATOL, gap
