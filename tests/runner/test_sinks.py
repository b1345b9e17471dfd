"""Metric sinks: every sink gets the same records for the same run — ``metrics.jsonl``,
TensorBoard event files, a Weights & Biases offline run, an MLflow ``file:`` store and a sink
of the user's — each read back from what it wrote; every term, the learning rates, the gradient
norm and the token count reach them, with the values computed by hand."""

from __future__ import annotations

import glob
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import purekd
from purekd.runner import MetricSink, MlflowSink, WandbSink, metric_sink

from ._helpers import adaptor, dataset, general_config, loader, models, train_config
from .test_token_normalisation import KEPT, TokenLM, batches, forward_kl_all_tokens, samples
from .test_token_normalisation import adaptor as token_adaptor

TERMS = {"kd_loss", "hidden_hidden_mse_2_3", "hard_label_loss"}
Records = dict[int, dict[str, float]]


class Recording:
    """A user's sink: keeps what it is given."""

    def __init__(self) -> None:
        self.records: Records = {}
        self.closed = 0

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        assert step not in self.records
        self.records[step] = dict(metrics)

    def close(self) -> None:
        self.closed += 1


def _jsonl(path: Path) -> Records:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {line.pop("step"): line for line in lines}


def _tensorboard(log_dir: Path, names: set[str]) -> Records:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from purekd.runner._sinks import tensorboard_tag

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {tensorboard_tag(n) for n in names}
    records: Records = {}
    for name in names:
        for event in events.Scalars(tensorboard_tag(name)):
            records.setdefault(event.step, {})[name] = event.value
    return records


def _wandb_history(run_dir: Path) -> Records:
    """The history records of a W&B offline run's ``.wandb`` file (a LevelDB-style log of
    protobuf records: a 7-byte file header, 32 KiB blocks, a 7-byte header per chunk)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    chunks, buffer, position = [], b"", 7
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:
            position += left
            continue
        _, size, kind = struct.unpack("<IHB", data[position:position + 7])
        if size == 0 and kind == 0:
            break
        buffer += data[position + 7:position + 7 + size]
        position += 7 + size
        if kind in (1, 4):  # a full record, or the last chunk of one
            chunks.append(buffer)
            buffer = b""
    records: Records = {}
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            step = items.pop("_step")
            records[step] = {k: v for k, v in items.items() if not k.startswith("_")}
    return records


def _mlflow(uri: str, run_id: str, names: set[str]) -> Records:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert set(client.get_run(run_id).data.metrics) == names
    records: Records = {}
    for name in names:
        for metric in client.get_metric_history(run_id, name):
            records.setdefault(metric.step, {})[name] = metric.value
    return records


def _close(actual: Records, expected: Records, tolerance: float = 0.0) -> None:
    assert actual.keys() == expected.keys()
    for step, record in expected.items():
        assert actual[step].keys() == record.keys(), step
        for name, value in record.items():
            assert actual[step][name] == pytest.approx(value, rel=tolerance, abs=tolerance), \
                (step, name)


def test_every_sink_writes_the_same_records(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, logs = tmp_path / "out", tmp_path / "tb"
    recording = Recording()
    wandb_sink = WandbSink(project="purekd-test", mode="offline", dir=str(tmp_path / "wb"))
    uri = (tmp_path / "mlruns").as_uri()
    mlflow_sink = MlflowSink(uri, experiment="sinks")
    teacher, student = models()
    distiller = purekd.GeneralDistiller(
        train_config(out, log_dir=str(logs), gradient_accumulation_steps=2, ckpt_steps=2),
        general_config(), teacher, student, adaptor, adaptor, compile=False)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1),
                        loader(dataset(8), batch_size=2), num_steps=3, max_grad_norm=5.0,
                        metric_sinks=[recording, wandb_sink, mlflow_sink])

    expected = recording.records
    assert recording.closed == 1
    assert sorted(expected) == list(range(6))  # one record per micro-batch
    names = {"loss", "global_step", *TERMS, "lr", "lr_1", "grad_norm"}  # lr_1: the projection
    assert set().union(*expected.values()) == names
    for step, record in expected.items():
        assert record["global_step"] == step // 2
        assert record["lr"] == 0.1 and record["lr_1"] == 0.1
        assert ("grad_norm" in record) == (step % 2 == 1)  # the optimizer step's last micro-batch

    _close(_jsonl(out / "metrics.jsonl"), expected)
    _close(_tensorboard(logs, names), expected, tolerance=1e-6)  # float32 event values
    _close(_wandb_history(tmp_path / "wb"), expected)
    _close(_mlflow(uri, mlflow_sink.run_id, names), expected)


def test_the_records_hold_the_hand_computed_values(tmp_path: Path) -> None:
    """One optimizer step over four micro-batches of a token-normalised forward KL: the tokens
    of each micro-batch, the learning rate in effect and the norm of the gradient of the
    all-token loss, computed by hand."""
    teacher, student = TokenLM(7, seed=0), TokenLM(4, seed=1)
    x, mask = batches(samples(), len(KEPT))[0]
    reference = TokenLM(4, seed=1)
    forward_kl_all_tokens(reference, teacher, x, mask).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))

    recording = Recording()
    teacher, student = TokenLM(7, seed=0), TokenLM(4, seed=1)
    config = purekd.DistillationConfig(kd_loss_type="forward_kl", temperature=1)
    distiller = purekd.GeneralDistiller(
        train_config(tmp_path, gradient_accumulation_steps=4), config, teacher, student,
        token_adaptor, token_adaptor, compile=False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.7)
    with distiller:
        distiller.train(optimizer, batches(samples(), 2), num_steps=2,
                        scheduler_class=torch.optim.lr_scheduler.StepLR,
                        scheduler_args={"step_size": 1, "gamma": 0.5}, metric_sinks=[recording])
    records = recording.records
    assert [records[s]["tokens"] for s in range(8)] == [7, 6, 8, 8] * 2
    assert [records[s]["lr"] for s in range(8)] == [0.7] * 4 + [0.35] * 4  # before the decay
    assert [s for s in range(8) if "grad_norm" in records[s]] == [3, 7]
    assert records[3]["grad_norm"] == pytest.approx(norm.item(), rel=1e-7)  # logged as float32
    assert _jsonl(tmp_path / "metrics.jsonl") == records


def test_metric_sink_by_name(tmp_path: Path) -> None:
    sink = metric_sink("jsonl", path=tmp_path / "m.jsonl")
    assert isinstance(sink, MetricSink)
    sink.log(3, {"loss": 1.5})
    sink.close()
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 3, "loss": 1.5}\n'
    with pytest.raises(ValueError, match=r"metric sink 'neptune': unknown; the sinks are "
                                         r"\['jsonl', 'mlflow', 'tensorboard', 'wandb'\]"):
        metric_sink("neptune")
    with pytest.raises(TypeError, match=r"metric sink 'jsonl': .*'where'"):
        metric_sink("jsonl", where="x")


@pytest.mark.parametrize(("sinks", "message"), [
    ("wandb", r"metric_sinks='wandb': must be a list of sink objects"),
    ([print], r"metric_sinks\[0\]=<built-in function print>: a sink needs the methods "
              r"log\(step, metrics\) and close\(\)"),
])
def test_bad_sinks_are_refused_before_training(sinks: Any, message: str, tmp_path: Path) -> None:
    teacher, student = models()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    distiller = purekd.GeneralDistiller(train_config(tmp_path), general_config(), teacher,
                                        student, adaptor, adaptor, compile=False)
    with distiller, pytest.raises(TypeError, match=message):
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1),
                        loader(dataset(8), batch_size=2), num_steps=2, metric_sinks=sinks)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_the_sinks_are_closed_when_training_fails_before_it_starts(tmp_path: Path) -> None:
    """A refused resume (no state in the directory) still closes the user's sinks (a W&B or
    MLflow run is not left open)."""
    recording = Recording()
    teacher, student = models()
    distiller = purekd.GeneralDistiller(train_config(tmp_path), general_config(), teacher,
                                        student, adaptor, adaptor, compile=False)
    with distiller, pytest.raises(FileNotFoundError, match=r"no gs<step>\.state\.pt file"):
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1),
                        loader(dataset(8), batch_size=2), num_steps=2, resume_from=tmp_path,
                        metric_sinks=[recording])
    assert recording.closed == 1 and recording.records == {}
