"""The teacher of a recipe run from a top-k cache: written once over the training rows (each
torchrun rank writing its share, rank 0 merging), reused when a previous run wrote it for the
same teacher, tokenizer, k and rows."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ._data import RowDataset
from ._models import vocabulary_size


def _cache_adaptor(batch: Mapping[str, Tensor], outputs: Any) -> dict[str, Any]:
    """The logits, and the padding mask as the rows to store (right-padded rows)."""
    return {"logits": outputs.logits, "logits_mask": batch["attention_mask"]}


class _PadWithIds:
    """Collate ``{'sample_id', 'teacher': {'input_ids', 'attention_mask'}}`` items, the
    teacher's rows right-padded with ``pad_id`` (rows of one length: plain stacking)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        length = max(len(item["teacher"]["input_ids"]) for item in items)
        ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(items), length, dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["teacher"]["input_ids"])
            ids[row, :n] = item["teacher"]["input_ids"]
            mask[row, :n] = item["teacher"]["attention_mask"]
        return {"sample_id": torch.tensor([item["sample_id"] for item in items]),
                "teacher": {"input_ids": ids, "attention_mask": mask}}


class _Inputs(Dataset):
    """The rows without their labels (the teacher is not asked for its own loss)."""

    def __init__(self, rows: RowDataset, indices: list[int]):
        self.rows, self.indices = rows, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = self.rows[self.indices[index]]
        return {"input_ids": item["input_ids"], "attention_mask": item["attention_mask"]}


def teacher_cache(teacher: nn.Module, tokenizer: Any, rows: RowDataset, folder: Path, *,
                  k: int, values: str, batch_size: int, progress_bar: bool | None,
                  rank: int = 0, world_size: int = 1, pad_id: int = 0) -> Any:
    """The finished top-``k`` cache of ``teacher`` over ``rows`` (sample id = row index) in
    ``folder``: written now (rank ``r`` of ``world_size`` writes rows ``r, r + W, ...``;
    ``write_teacher_cache`` merges once every rank is done; rows of different lengths padded
    with ``pad_id``, only real tokens stored), or reused when ``folder`` holds a
    finished cache for the same teacher, tokenizer and vocabulary. A cache written for another
    teacher, tokenizer or vocabulary is an error naming the fix."""
    from purekd.teacher_cache import (
        TeacherCache,
        WithSampleIds,
        fingerprint_model,
        write_teacher_cache,
    )

    fingerprint = fingerprint_model(teacher)
    vocabulary = vocabulary_size(teacher)
    if not (folder / "manifest.json").exists():
        mine = list(range(rank, len(rows), world_size))
        loader = DataLoader(WithSampleIds(_Inputs(rows, mine), mine), batch_size=batch_size,
                            shuffle=False, collate_fn=_PadWithIds(pad_id))
        write_teacher_cache(teacher, _cache_adaptor, loader, folder, k=k, values=values,
                            vocab_size=vocabulary, tokenizer=tokenizer,
                            teacher_fingerprint=fingerprint, device="cpu",
                            progress_bar=progress_bar)
    try:
        return TeacherCache(folder, vocab_size=vocabulary, k=k, tokenizer=tokenizer,
                            teacher=fingerprint)
    except ValueError as error:
        raise ValueError(f"{error} — {folder} holds a teacher cache from another run: delete it "
                         "(or give another output directory / teacher.cache_dir) and a new one "
                         "is written") from error


__all__ = ["teacher_cache"]
