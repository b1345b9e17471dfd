from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from . import _tiny


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    return _tiny.write_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    return _tiny.write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def recipe_data(teacher_dir, data_files, tmp_path):
    """A small valid recipe as plain data (a top-k cache, packed text, 4 steps)."""
    return {
        "teacher": {"path": str(teacher_dir), "source": "cache", "k": 8},
        "student": {"layers": 2},
        "data": {"path": str(data_files["text"]), "format": "text", "seq_len": 16,
                 "eval_rows": 2},
        "loss": {"kd_loss_type": "forward_kl", "ce_weight": 1.0},
        "optimizer": {"name": "adamw", "lr": 1e-2},
        "schedule": {"name": "cosine", "warmup": 0.25},
        "train": {"steps": 4, "batch_size": 4, "device": "cpu", "compile": False},
        "checkpoint": {"output_dir": str(tmp_path / "run"), "every": 2},
        "metrics": {"progress_bar": False},
    }


@pytest.fixture(autouse=True)
def _eager_blocks(monkeypatch):
    """The fused loss's block kernels eager (compiling them takes ~30 s on CPU; the
    compiled path is tested with the losses)."""
    from purekd.losses import _blockwise

    monkeypatch.setattr(_blockwise, "COMPILE_BLOCKS", False)
