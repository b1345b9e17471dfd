"""A recipe run end to end on a random-initialised 4-layer Llama teacher and a 2-layer student
built from it: the student written as a save_pretrained directory that from_pretrained loads
and that generates the in-memory student's tokens; checkpoints, summary, chat data with a live
teacher."""

from __future__ import annotations

import json
import math

import pytest
import torch

from purekd.recipes import validate
from purekd.recipes._run import run


def _generate(model, tok):
    prompt = tok("And God said", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    return out[0, prompt["input_ids"].shape[1]:].tolist()


def test_a_cached_run_writes_a_student_that_from_pretrained_loads_and_generates(recipe_data,
                                                                                tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = validate(recipe_data)
    lines = []
    summary = run(recipe, progress_bar=False, echo=lines.append)
    out = tmp_path / "run"
    assert summary.steps == 4 and summary.tokens == 4 * 4 * 16
    assert summary.student_dir == str(out / "student")
    assert math.isfinite(summary.perplexity) and summary.perplexity < summary.perplexity_before
    assert "held-out ppl" in lines[-1] and str(out / "student") in lines[-1]
    files = {p.name for p in (out / "student").iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json"} <= files
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
    assert {"gs2.pkl", "gs4.pkl", "student-gs2", "student-gs4"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "summary.json").read_text())["steps"] == 4

    # the in-memory student: the teacher's layers [0, 3] trained by the same run, as gs4.pkl
    loaded = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    tok = AutoTokenizer.from_pretrained(out / "student")
    final = torch.load(out / "gs4.pkl", weights_only=True)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, final[name]), name
    assert loaded.config.num_hidden_layers == 2
    at2 = AutoModelForCausalLM.from_pretrained(out / "student-gs2")
    middle = torch.load(out / "gs2.pkl", weights_only=True)
    assert all(torch.equal(v, middle[k]) for k, v in at2.state_dict().items())

    from purekd.recipes._run import load_models

    _, student, _ = load_models(recipe, progress_bar=False)
    student.load_state_dict(final)
    tokens = _generate(student.eval(), tok)
    assert len(tokens) == 8 and _generate(loaded, tok) == tokens


def test_a_live_teacher_on_chat_data_trains_on_completion_tokens(recipe_data, data_files,
                                                                  tmp_path):
    data = dict(recipe_data)
    data["teacher"] = {**recipe_data["teacher"], "source": "live"}
    data["data"] = {"path": str(data_files["chat"]), "format": "messages", "packing": False,
                    "seq_len": 64, "eval_rows": 2}
    data["loss"] = {"kd_loss_type": "jsd", "beta": 0.5, "ce_weight": 0.5}
    data["train"] = {**recipe_data["train"], "steps": None, "epochs": 1, "accumulation": 2}
    data["checkpoint"] = {"output_dir": str(tmp_path / "chat"), "save_pretrained": True}
    data["metrics"] = {"sinks": ["jsonl", "tensorboard"], "progress_bar": False}
    summary = run(validate(data), echo=lambda _: None)
    # 14 training conversations, batches of 4 (3), 2 per step: one step in the epoch
    assert summary.steps == 1
    assert math.isfinite(summary.perplexity)
    out = tmp_path / "chat"
    assert (out / "student" / "model.safetensors").is_file()
    assert any((out / "tensorboard").iterdir())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(math.isfinite(r["kd_loss"]) for r in records)  # 3 batches


def test_a_student_of_its_own_and_a_tokenizer_directory(recipe_data, teacher_dir, data_files,
                                                        tmp_path):
    from transformers import AutoModelForCausalLM

    from . import _tiny

    own = _tiny.llama(len(_tiny.tokenizer()), layers=1, seed=3)
    own.save_pretrained(tmp_path / "own")
    data = dict(recipe_data)
    data["student"] = {"path": str(tmp_path / "own")}
    data["tokenizer"] = str(teacher_dir)
    data["teacher"] = {"path": str(teacher_dir), "source": "live"}
    data["data"] = {"path": str(data_files["pc"]), "seq_len": 24, "packing": True}
    data["train"] = {**recipe_data["train"], "steps": 2}
    data["checkpoint"] = {"output_dir": str(tmp_path / "own-run"), "save_state": False}
    summary = run(validate(data), echo=lambda _: None)
    assert summary.steps == 2 and summary.perplexity is None  # no held-out rows asked for
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "own-run" / "student")
    assert trained.config.num_hidden_layers == 1
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight,
                           own.model.layers[0].mlp.up_proj.weight)


def test_bf16_autocast_and_epochs(recipe_data, tmp_path):
    data = dict(recipe_data)
    data["train"] = {**recipe_data["train"], "steps": None, "epochs": 1, "bf16": True,
                     "batch_size": 32}
    data["data"] = {**recipe_data["data"], "train_rows": 64}
    data["checkpoint"] = {"output_dir": str(tmp_path / "bf16"), "save_state": False}
    summary = run(validate(data), echo=lambda _: None)
    assert summary.steps == 2  # 64 rows, batches of 32, one epoch
    assert math.isfinite(summary.perplexity)
    out = tmp_path / "bf16"
    assert {"gs2.pkl", "student-gs2", "student"} <= {p.name for p in out.iterdir()}
    weights = torch.load(out / "gs2.pkl", weights_only=True)
    assert all(v.dtype == torch.float32 for v in weights.values())  # autocast, fp32 weights


def test_the_metrics_section_reaches_wandb_and_mlflow(recipe_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as the runner's sink tests
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    data = dict(recipe_data)
    data["metrics"] = {"sinks": ["jsonl", "wandb", "mlflow"], "project": "recipe-test",
                       "wandb": {"mode": "offline", "dir": str(tmp_path / "wb")},
                       "mlflow": {"tracking_uri": uri}, "progress_bar": False}
    data["checkpoint"] = {"output_dir": str(tmp_path / "sinks"), "save_state": False}
    run(validate(data), echo=lambda _: None)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("recipe-test")
    (found,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(found.info.run_id, "kd_loss")
    records = [json.loads(line)
               for line in (tmp_path / "sinks" / "metrics.jsonl").read_text().splitlines()]
    assert [m.value for m in history] == pytest.approx([r["kd_loss"] for r in records])
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_cached_teacher_on_unpacked_chats_of_different_lengths(recipe_data, data_files,
                                                                  tmp_path):
    from purekd.teacher_cache import TeacherCache

    data = dict(recipe_data)
    data["data"] = {"path": str(data_files["chat"]), "packing": False, "seq_len": 64,
                    "eval_rows": 2}
    data["checkpoint"] = {"output_dir": str(tmp_path / "chat-cache"), "save_state": False}
    data["train"] = {**recipe_data["train"], "steps": 2}
    summary = run(validate(data), echo=lambda _: None)
    assert summary.steps == 2 and math.isfinite(summary.perplexity)
    cache = TeacherCache(tmp_path / "chat-cache" / "teacher_cache")
    from purekd.recipes._data import build

    from . import _tiny

    split = build(validate(data).data, _tiny.tokenizer())
    assert [len(cache[i].topk_ids) for i in range(len(split.train))] == \
        [len(ids) for ids in split.train.ids]  # only real tokens stored, no padding


def test_compile_false_keeps_the_fused_losses_block_kernels_eager(recipe_data, tmp_path,
                                                                  monkeypatch):
    """``train.compile: false`` reaches the fused loss's block kernels (no global switch: the
    step's loss path runs them eagerly, call by call)."""
    from purekd import _compiling
    from purekd.losses import _blockwise

    monkeypatch.setattr(_blockwise, "COMPILE_BLOCKS", True)  # as in a real run
    made = _blockwise.block_kernel
    compiled = []

    def recording(*args, **kwargs):
        kernel = made(*args, **kwargs)
        compiled.append(isinstance(kernel, _compiling.Compiled))
        return kernel

    monkeypatch.setattr(_blockwise, "block_kernel", recording)
    data = dict(recipe_data)
    data["train"] = {**recipe_data["train"], "steps": 2, "compile": False}
    data["checkpoint"] = {"output_dir": str(tmp_path / "eager"), "save_state": False}
    run(validate(data), echo=lambda _: None)
    assert compiled and not any(compiled)  # every block of every step, eager
    assert _compiling.blocks_may_compile()
