"""Atomic checkpoint files: a failed write leaves the previous file intact and no temporary
file behind; checkpoints load with ``torch.load(weights_only=True)``; names and lookup."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import purekd
from purekd.runner import atomic_save, latest_state, state_path, weights_path

from ._helpers import adaptor, dataset, general_config, loader, models, train_config


class DiskFull(OSError):
    pass


def _failing_save(real_save):
    """A ``torch.save`` that writes the first part of the data, then fails."""

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(17)  # what a crash half-way through the write would leave
        raise DiskFull("no space left on device")

    return save


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "gs3.pkl"
    old = {"w": torch.arange(6.0)}
    atomic_save(old, path)
    before = path.read_bytes()

    monkeypatch.setattr(torch, "save", _failing_save(torch.save))
    with pytest.raises(DiskFull):
        atomic_save({"w": torch.zeros(100)}, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert torch.equal(torch.load(path, weights_only=True)["w"], old["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gs3.pkl"]  # no temporary file left


def test_a_failed_first_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch, "save", _failing_save(torch.save))
    with pytest.raises(DiskFull):
        atomic_save({"w": torch.zeros(3)}, tmp_path / "sub" / "gs1.pkl")
    assert list((tmp_path / "sub").iterdir()) == []


def test_an_interrupt_during_the_write_cleans_up(tmp_path: Path, monkeypatch) -> None:
    def interrupted(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    path = tmp_path / "x.pt"
    atomic_save([1, 2], path)
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_save([3], path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_atomic_save_returns_the_path_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.pt"
    assert atomic_save({"v": 1}, path) == path
    atomic_save({"v": 2}, path)
    assert torch.load(path, weights_only=True) == {"v": 2}
    assert [p.name for p in path.parent.iterdir()] == ["b.pt"]


def test_a_failed_checkpoint_during_training_keeps_earlier_ones(tmp_path: Path,
                                                                monkeypatch) -> None:
    """The write of gs4.pkl fails: gs2.pkl stays what it was, no gs4.pkl, no temporary file."""
    teacher, student = models()
    distiller = purekd.GeneralDistiller(train_config(tmp_path, ckpt_steps=2), general_config(),
                                        teacher, student, adaptor, adaptor, compile=False)
    real_save = torch.save
    saved: dict[int, bytes] = {}

    def callback(model, step):
        saved[step] = (tmp_path / f"gs{step}.pkl").read_bytes()
        if step == 2:
            monkeypatch.setattr(torch, "save", _failing_save(real_save))

    with distiller, pytest.raises(DiskFull):
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), loader(dataset(8)),
                        num_steps=6, callback=callback)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gs2.pkl", "metrics.jsonl"]
    assert (tmp_path / "gs2.pkl").read_bytes() == saved[2]


def test_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    teacher, student = models()
    distiller = purekd.GeneralDistiller(train_config(tmp_path, ckpt_steps=2), general_config(),
                                        teacher, student, adaptor, adaptor, compile=False)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), loader(dataset(8)),
                        num_steps=3)
    assert sorted(p.name for p in tmp_path.glob("gs*")) == ["gs2.pkl", "gs3.pkl"]
    final = torch.load(tmp_path / "gs3.pkl", weights_only=True)
    assert final.keys() == student.state_dict().keys()  # the student only, TextBrewer's format
    for key, value in student.state_dict().items():
        assert torch.equal(final[key], value)
    student.load_state_dict(torch.load(tmp_path / "gs2.pkl", weights_only=True))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_paths_and_latest_state(tmp_path: Path) -> None:
    assert weights_path(tmp_path, 7) == tmp_path / "gs7.pkl"
    assert state_path(tmp_path, 7) == tmp_path / "gs7.state.pt"
    for step in (2, 10, 9):
        atomic_save({}, state_path(tmp_path, step))
    (tmp_path / ".gs11.state.pt.abc.tmp").write_bytes(b"partial")  # a crashed write
    (tmp_path / "gs12.pkl").write_bytes(b"")
    assert latest_state(tmp_path) == tmp_path / "gs10.state.pt"  # numeric, not lexical, order
    assert latest_state(tmp_path / "gs2.state.pt") == tmp_path / "gs2.state.pt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="save_state=True"):
        latest_state(tmp_path / "empty")
