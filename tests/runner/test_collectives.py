"""purekd's collectives return only once the backend's worker thread let go of their tensors.

A worker thread that drops the last C++ reference to a tensor with a Python object needs the
GIL; if the interpreter is finalising by then, the process aborts after a successful run
("terminate called without an active exception"). The two-rank test counts, after each
collective, the references to its tensor: with ``dist.all_reduce`` alone about half the calls
return while the worker still holds one."""

from __future__ import annotations

import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from purekd import _collectives

from .._torchrun import torchrun

SCRIPT = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from purekd import _collectives
    from purekd.runner import _distributed

    dist.init_process_group("gloo")
    late = []
    for i in range(300):
        t = torch.full((3,), float(dist.get_rank() + i))
        before = sys.getrefcount(t)
        if i % 2:
            _collectives.all_reduce(t)
            assert t.tolist() == [2.0 * i + 1] * 3, t
        else:
            _collectives.broadcast(t, src=0)
            assert t.tolist() == [float(i)] * 3, t
        late.append(sys.getrefcount(t) - before)
    total = _distributed.all_reduce_sum(torch.tensor([1.0]))
    assert total.item() == 2.0
    assert _distributed.broadcast_flag(dist.get_rank() == 0, "cpu") is True
    assert sum(late) == 0, f"rank {dist.get_rank()}: {sum(late)} calls returned early"
    dist.destroy_process_group()
''')

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is unavailable")


def test_collectives_return_after_the_worker_let_go_on_two_ranks(tmp_path: Path) -> None:
    script = tmp_path / "collectives.py"
    script.write_text(SCRIPT)
    done = torchrun(script)
    assert done.returncode == 0


def test_settled_waits_for_the_reference_a_worker_thread_drops_later() -> None:
    tensor = torch.zeros(2)
    references = sys.getrefcount(tensor)
    events: list[str] = []
    workers: list[threading.Thread] = []

    def collective(value: torch.Tensor, *, scale: float) -> None:
        """Done in place at once; a worker thread holds ``value`` for 50 ms more."""
        value.add_(scale)
        held = [value]

        def drop() -> None:
            time.sleep(0.05)
            events.append("dropped")
            held.clear()

        workers.append(threading.Thread(target=drop))
        workers[0].start()

    assert _collectives.settled(collective, tensor, scale=2.0) is True
    events.append("returned")
    workers[0].join()
    assert events == ["dropped", "returned"]
    assert tensor.tolist() == [2.0, 2.0]
    assert sys.getrefcount(tensor) == references


def test_settled_returns_at_once_when_nothing_holds_the_tensor(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_collectives, "RELEASE_TIMEOUT_S", 3600.0)  # a wrong wait would hang
    tensor = torch.zeros(2)
    assert _collectives.settled(lambda value: value.add_(1), tensor) is True
    assert tensor.tolist() == [1.0, 1.0]


def test_settled_warns_and_goes_on_after_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_collectives, "RELEASE_TIMEOUT_S", 0.01)
    kept: list[torch.Tensor] = []

    def keep_forever(value: torch.Tensor) -> None:
        kept.append(value)

    with pytest.warns(RuntimeWarning, match=r"keep_forever: the backend still held the tensor "
                                            r"0\.01 s after the collective returned"):
        assert _collectives.settled(keep_forever, torch.zeros(2)) is False


def test_guard_exit_registers_one_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[tuple[object, tuple[object, ...]]] = []
    monkeypatch.setattr(_collectives, "_exit_guarded", False)
    monkeypatch.setattr(_collectives.atexit, "register",
                        lambda fn, *args: registered.append((fn, args)))
    _collectives.guard_exit()
    _collectives.guard_exit()
    assert registered == [(time.sleep, (_collectives.EXIT_GRACE_S,))]


def test_settled_does_not_wait_for_tensors_off_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_collectives, "RELEASE_TIMEOUT_S", 3600.0)  # a wait would hang
    kept: list[torch.Tensor] = []
    assert _collectives.settled(kept.append, torch.empty(2, device="meta")) is True
    assert len(kept) == 1
