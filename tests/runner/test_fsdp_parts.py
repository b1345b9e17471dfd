"""The parts of FSDP2 training, in this process with a one-process gloo group: the block policy,
teacher placement (a sharded teacher is freed again after its forward), optimizer rebinding,
the all-ranks non-finite guard, the world-size check of a sharded state, and the config."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import purekd
from purekd.runner import _fsdp, _sharded_state
from purekd.runner._guard import AllRanksNonFiniteGuard, NonFiniteLossError

from ._helpers import Tiny

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is unavailable")


def _llama(layers: int = 2, hidden: int = 16) -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=hidden,
                                      intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _bert_mlm() -> nn.Module:
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32)
    return transformers.BertForMaskedLM(config)


@pytest.fixture
def one_process_group(tmp_path: Path) -> Iterator[None]:
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# -- the block policy ---------------------------------------------------------------------------


def test_default_blocks_are_the_decoder_layers_of_a_llama() -> None:
    model = _llama(layers=3)
    assert _fsdp.block_modules(model) == list(reversed(model.model.layers))


def test_default_blocks_of_bert_are_its_layers_not_the_embeddings_an_mlm_head_shares() -> None:
    model = _bert_mlm()
    assert _fsdp.hugging_face_block_names(model) == {"BertLayer", "BertEmbeddings"}
    assert _fsdp.block_modules(model) == list(reversed(model.bert.encoder.layer))


def test_a_model_without_hugging_face_blocks_has_none_by_default() -> None:
    assert _fsdp.block_modules(Tiny()) == []


def test_blocks_by_class_name_and_by_function_innermost_first() -> None:
    model = Tiny(layers=2)
    assert _fsdp.block_modules(model, ("Linear",)) == [model.out, model.blocks[1],
                                                       model.blocks[0], model.embed]
    chosen = _fsdp.block_modules(model, lambda m: isinstance(m, nn.ModuleList)
                                 or m is model.blocks[0])
    assert chosen == [model.blocks[0], model.blocks]  # the child before its parent


# -- teacher placement ----------------------------------------------------------------------------


def _step(student: nn.Module, teacher: nn.Module) -> purekd.Step:
    def adaptor(batch, outputs):
        return {"logits": outputs.logits.flatten(0, 1)}

    return purekd.make_step(purekd.DistillationConfig(temperature=1), teacher, student,
                            adaptor, adaptor, compile=False)


def _gathered(module: nn.Module) -> list[str]:
    """The names of parameters that are plain (gathered) tensors rather than shards."""
    return [name for name, p in module.named_parameters() if not isinstance(p, DTensor)]


@pytest.mark.usefixtures("one_process_group")
def test_a_sharded_teacher_is_freed_again_after_its_forward() -> None:
    student, teacher = _llama(1), _llama(2, hidden=24)
    step = _step(student, teacher)
    done = _fsdp.shard_models(step, student, purekd.FSDPConfig(teacher="shard"),
                              device=torch.device("cpu"), bf16=False)
    assert done.student_blocks == 1 and done.teacher_blocks == (2,)
    ids = torch.randint(32, (2, 5))
    out = step({"input_ids": ids})
    assert _gathered(teacher) == []  # the root too: reshard_after_forward=True given explicitly
    out.loss.backward()
    assert _gathered(step) == []

    # the default for a root keeps its parameters gathered after the forward (#149029): the
    # check above can fail
    other = _llama(2, hidden=24)
    fully_shard(other)
    with torch.no_grad():
        other(input_ids=ids)
    assert "model.embed_tokens.weight" in _gathered(other)


@pytest.mark.usefixtures("one_process_group")
def test_a_replicated_teacher_is_left_alone_and_an_absent_one_refuses_calls() -> None:
    student, teacher = _llama(1), _llama(1, hidden=24)
    done = _fsdp.shard_models(_step(student, teacher), student,
                              purekd.FSDPConfig(teacher="replicate"), device=torch.device("cpu"),
                              bf16=False)
    assert not _fsdp.is_sharded(teacher) and done.teacher_blocks == ()
    assert _gathered(teacher) == [name for name, _ in teacher.named_parameters()]

    student, teacher = _llama(1), _llama(1, hidden=24)
    step = _step(student, teacher)
    done = _fsdp.shard_models(step, student, purekd.FSDPConfig(teacher="none"),
                              device=torch.device("cpu"), bf16=False)
    with pytest.raises(ValueError, match="teacher='none' but the teacher LlamaForCausalLM was called"):
        step({"input_ids": torch.randint(32, (2, 5))})
    done.close()
    step({"input_ids": torch.randint(32, (2, 5))})  # the hook is gone


@pytest.mark.usefixtures("one_process_group")
def test_bf16_gathers_bfloat16_and_keeps_float32_shards() -> None:
    student, teacher = _llama(1), _llama(1, hidden=24)
    step = _step(student, teacher)
    _fsdp.shard_models(step, student, purekd.FSDPConfig(), device=torch.device("cpu"), bf16=True)
    seen = []
    student.model.layers[0].mlp.up_proj.register_forward_hook(
        lambda m, i, o: seen.append(m.weight.dtype))
    step({"input_ids": torch.randint(32, (2, 5))}).loss.backward()
    assert seen == [torch.bfloat16]
    weight = student.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.float32 and weight.grad.dtype == torch.float32


# -- the optimizer --------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_process_group")
def test_the_optimizer_is_pointed_at_the_sharded_parameters() -> None:
    student, teacher = _llama(1), _llama(1, hidden=24)
    step = _step(student, teacher)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    names = _fsdp.parameter_names(step)
    _fsdp.shard_models(step, student, purekd.FSDPConfig(), device=torch.device("cpu"),
                       bf16=False)
    _fsdp.rebind_optimizer(optimizer, names, step)
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == \
        [id(p) for p in student.parameters()]
    assert all(isinstance(p, DTensor) for p in optimizer.param_groups[0]["params"])


@pytest.mark.usefixtures("one_process_group")
def test_an_optimizer_with_foreign_parameters_or_state_is_refused() -> None:
    student, teacher = _llama(1), _llama(1, hidden=24)
    step = _step(student, teacher)
    names = _fsdp.parameter_names(step)
    stranger = torch.optim.SGD([*student.parameters(), nn.Parameter(torch.ones(3))], lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[0\] holds a parameter of shape \(3,\)"):
        _fsdp.rebind_optimizer(stranger, names, step)
    stepped = torch.optim.Adam(student.parameters())
    student(input_ids=torch.randint(32, (1, 3))).logits.sum().backward()
    stepped.step()
    with pytest.raises(ValueError, match="already holds state"):
        _fsdp.rebind_optimizer(stepped, names, step)


# -- the non-finite guard and the world-size check -----------------------------------------------


@pytest.mark.usefixtures("one_process_group")
def test_the_all_ranks_guard_raises_naming_the_step_and_the_term() -> None:
    guard = AllRanksNonFiniteGuard()
    guard.observe(1, torch.tensor(1.0), {"kd": torch.tensor(1.0)})
    guard.raise_if_tripped()  # finite: nothing
    guard.observe(2, torch.tensor(float("nan")), {"kd": torch.tensor(float("nan"))})
    guard.observe(3, torch.tensor(float("inf")), {"kd": torch.tensor(1.0)})
    with pytest.raises(NonFiniteLossError, match="global step 2 \\(term 'kd'"):
        guard.raise_if_tripped()
    guard.raise_if_tripped()  # cleared


def test_the_fingerprint_of_a_sharded_run_holds_the_global_batch() -> None:
    describe = {"data": {"kind": "DataLoader", "batch_size": 4, "length": 3}, "options": {}}
    assert _fsdp.global_batches(describe, 2) == {
        "data": {"kind": "DataLoader", "global_batch_size": 8, "length": 3}, "options": {}}
    by_task = {"data": {"a": {"kind": "DataLoader", "batch_size": 2}, "b": {"kind": "list"}}}
    assert _fsdp.global_batches(by_task, 3) == {
        "data": {"a": {"kind": "DataLoader", "global_batch_size": 6}, "b": {"kind": "list"}}}
    assert _fsdp.global_batches(None, 2) is None


def test_latest_sharded_state_skips_unfinished_directories(tmp_path: Path) -> None:
    for step in (2, 4):
        (tmp_path / f"gs{step}.state").mkdir()
    (tmp_path / "gs2.state" / _sharded_state.MARKER).write_text("{}")
    (tmp_path / ".gs6.state.tmp").mkdir()
    assert _sharded_state.latest_sharded_state(tmp_path) == tmp_path / "gs2.state"
    with pytest.raises(FileNotFoundError, match=r"no gs<step>\.state/ directory"):
        _sharded_state.latest_sharded_state(tmp_path / "gs4.state")


# -- the config -----------------------------------------------------------------------------------


def test_the_fsdp_option_round_trips_and_bad_values_name_the_field() -> None:
    config = purekd.TrainingConfig(device="cpu", fsdp={"teacher": "replicate",
                                                       "blocks": ["LlamaDecoderLayer"]})
    assert config.fsdp == purekd.FSDPConfig(teacher="replicate", blocks=("LlamaDecoderLayer",))
    assert purekd.TrainingConfig.from_dict(config.to_dict()) == config
    assert purekd.TrainingConfig(fsdp=True).fsdp == purekd.FSDPConfig()
    assert purekd.TrainingConfig(fsdp=False).fsdp is None
    bad = [({"fsdp": {"teacher": "sharded"}}, ValueError, "FSDPConfig.teacher='sharded'"),
           ({"fsdp": {"blocks": []}}, ValueError, "FSDPConfig.blocks=()"),
           ({"fsdp": {"shard": True}}, ValueError, r"unknown key\(s\) \['shard'\]"),
           ({"fsdp": "yes"}, TypeError, "TrainingConfig.fsdp='yes'"),
           ({"fsdp": True, "fp16": True}, ValueError, "use bf16=True"),
           ({"fsdp": True, "data_parallel": True}, ValueError, "choose one")]
    for fields, error, message in bad:
        with pytest.raises(error, match=message):
            purekd.TrainingConfig(**fields)


# -- the runner, sharded, in one process ----------------------------------------------------------


def _causal_adaptor(batch, outputs):
    return {"logits": outputs.logits.flatten(0, 1), "losses": outputs.loss}


def _distiller(out: Path, adaptor_S=_causal_adaptor,
               **fields) -> tuple[purekd.BasicDistiller, nn.Module]:
    student, teacher = _llama(2), _llama(2, hidden=24)
    config = purekd.TrainingConfig(device="cpu", output_dir=str(out), fsdp=True, **fields)
    distiller = purekd.BasicDistiller(config, {"temperature": 2, "hard_label_weight": 0.5},
                                      teacher, student, _causal_adaptor, adaptor_S,
                                      compile=False)
    return distiller, student


def _batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(32, (n, 2, 6), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


@pytest.mark.usefixtures("one_process_group")
def test_the_sharded_runner_evaluates_stops_early_and_trains_again(tmp_path: Path) -> None:
    distiller, student = _distiller(tmp_path / "out", ckpt_frequency=4)  # every step
    probe = torch.randint(32, (1, 6))
    seen = []

    def metric(model: nn.Module, step: int) -> float:  # a forward of the sharded model
        model.eval()
        with torch.no_grad():
            value = -float(model(input_ids=probe, labels=probe).loss)
        seen.append((step, type(model).__name__))
        return value if step == 1 else value - 100  # the best at step 1, then stale

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    with distiller:
        distiller.train(optimizer, _batches(), num_epochs=3, save_state=True,
                        early_stopping=purekd.EarlyStopping(metric=metric, patience=1))
    assert seen == [(1, "FSDPLlamaForCausalLM"), (2, "FSDPLlamaForCausalLM")]
    assert distiller.runner.counters.global_step == 2  # stopped after one stale checkpoint
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["best.pkl", "gs1.pkl", "gs1.state", "gs2.pkl", "gs2.state", "metrics.jsonl",
                     "run.json"]
    best = torch.load(tmp_path / "out" / "best.pkl", weights_only=True)
    _llama(2).load_state_dict(best)  # whole, under the unsharded names

    # a second train() on the sharded models, with a fresh optimizer
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=1e-2), _batches(), num_epochs=1,
                        overwrite_output_dir=True)
    assert distiller.runner.counters.global_step == 4


def _saved_run(out: Path) -> None:
    distiller, student = _distiller(out, ckpt_frequency=2)  # states at steps 2 and 4
    with distiller:
        distiller.train(torch.optim.AdamW(student.parameters()), _batches(), num_epochs=1,
                        save_state=True)


def _resume(out: Path, resume_from: Path) -> tuple[purekd.BasicDistiller, dict[str, torch.Tensor],
                                                  torch.optim.Optimizer]:
    """A fresh run resuming from ``resume_from``, and the student's weights before it."""
    other, student = _distiller(out, ckpt_frequency=2)
    optimizer = torch.optim.AdamW(student.parameters())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with other:
        other.train(optimizer, _batches(), num_epochs=1, save_state=True,
                    resume_from=str(resume_from))
    return other, before, optimizer


@pytest.mark.usefixtures("one_process_group")
def test_a_sharded_state_records_the_size_and_sha256_of_every_file(tmp_path: Path) -> None:
    import hashlib
    import json

    _saved_run(tmp_path / "out")
    state = tmp_path / "out" / "gs4.state"
    marker = json.loads((state / _sharded_state.MARKER).read_text())
    assert marker["version"] == 2 and marker["world_size"] == 1
    files = sorted(p.name for p in state.iterdir() if p.name != _sharded_state.MARKER)
    assert sorted(marker["files"]) == files and ".metadata" in files
    for name, (size, digest) in marker["files"].items():
        data = (state / name).read_bytes()
        assert size == len(data) and digest == hashlib.sha256(data).hexdigest()


@pytest.mark.usefixtures("one_process_group")
def test_a_damaged_shard_is_refused_naming_the_file_before_anything_loads(tmp_path: Path) -> None:
    _saved_run(tmp_path / "out")
    state = tmp_path / "out" / "gs4.state"
    shard = next(p for p in sorted(state.iterdir()) if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the size is unchanged
    shard.write_bytes(bytes(data))
    message = re.escape(f"{shard}: this file of the sharded state is damaged (its SHA-256")
    with pytest.raises(purekd.runner.StateError, match=message):
        _resume(tmp_path / "again", state)
    shard.write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(purekd.runner.StateError, match=re.escape(
            f"{shard}: this file of the sharded state has 100 bytes, {len(data)} were written")):
        _resume(tmp_path / "again", state)
    shard.unlink()
    with pytest.raises(purekd.runner.StateError, match=re.escape(f"{shard}: this file of the "
                                                                 "sharded state is missing")):
        _resume(tmp_path / "again", state)


@pytest.mark.usefixtures("one_process_group")
def test_resuming_a_directory_falls_back_past_a_damaged_sharded_state(tmp_path: Path) -> None:
    import json

    out = tmp_path / "out"
    _saved_run(out)
    metadata = out / "gs4.state" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:-1] + b"x")
    with pytest.warns(RuntimeWarning, match=r"skipped damaged sharded state\(s\): .*gs4\.state"
                                            r"/\.metadata: .*previous good state, gs2\.state"):
        other, _, _ = _resume(out, out)
    assert other.runner.counters.global_step == 4  # resumed at step 2, to the end
    (out / "gs4.state" / ".metadata").write_bytes(b"")  # rewritten by the resumed run: damaged
    marker = out / "gs2.state" / _sharded_state.MARKER
    fields = json.loads(marker.read_text())
    del fields["files"]
    marker.write_text(json.dumps(fields))
    with pytest.raises(purekd.runner.StateError, match=r"no usable sharded state of this run; "
                                                       r"damaged: .*gs4\.state/\.metadata: this "
                                                       r"file of the sharded state has 0 bytes.*; "
                                                       r".*gs2\.state/purekd\.json: the file "
                                                       r"list \('files'\) is missing"):
        _resume(tmp_path / "again", out)


@pytest.mark.usefixtures("one_process_group")
def test_a_non_finite_loss_stops_the_sharded_run_naming_the_step(tmp_path: Path) -> None:
    calls = []

    def poisoned(batch, outputs):  # the student's logits become NaN at the third batch
        calls.append(1)
        adapted = _causal_adaptor(batch, outputs)
        if len(calls) == 3:
            adapted["logits"] = adapted["logits"] * float("nan")
        return adapted

    distiller, student = _distiller(tmp_path / "out", adaptor_S=poisoned)
    with distiller, pytest.raises(purekd.NonFiniteLossError, match=r"global step 3 \(term 'kd_loss'"):
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), _batches(), num_epochs=1)


@pytest.mark.usefixtures("one_process_group")
def test_a_bf16_sharded_run_keeps_float32_weights_and_checkpoints(tmp_path: Path) -> None:
    distiller, student = _distiller(tmp_path / "out", bf16=True)
    with distiller:
        distiller.train(torch.optim.AdamW(student.parameters(), lr=1e-2), _batches(),
                        num_epochs=1)
    saved = torch.load(tmp_path / "out" / "gs4.pkl", weights_only=True)
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in saved.values())
    before = _llama(2).state_dict()
    assert any(not torch.equal(saved[k], before[k]) for k in before)  # it trained


@pytest.mark.usefixtures("one_process_group")
def test_a_sharded_output_layer_read_after_its_forward_is_gathered_with_its_gradient() -> None:
    from purekd.stages import normalise

    torch.manual_seed(0)
    head = nn.Linear(4, 6, bias=True)
    expected_weight, expected_bias = head.weight.detach().clone(), head.bias.detach().clone()
    fully_shard(head, reshard_after_forward=True)
    hidden = torch.randn(3, 4)
    head(hidden)  # the forward gathers, then the parameters are shards again
    assert isinstance(head.weight, DTensor)
    adapted = normalise({"lm_hidden": hidden, "lm_weight": head.weight, "lm_bias": head.bias})
    assert type(adapted.lm_weight) is torch.Tensor and type(adapted.lm_bias) is torch.Tensor
    assert torch.equal(adapted.lm_weight, expected_weight)
    assert torch.equal(adapted.lm_bias, expected_bias)
    (hidden @ adapted.lm_weight.T + adapted.lm_bias).square().sum().backward()
    logits = hidden @ expected_weight.T + expected_bias  # by hand: d/dW sum(z^2) = 2 z^T h
    assert isinstance(head.weight.grad, DTensor)
    torch.testing.assert_close(head.weight.grad.full_tensor(), 2 * logits.T @ hidden)
    torch.testing.assert_close(head.bias.grad.full_tensor(), 2 * logits.sum(0))
