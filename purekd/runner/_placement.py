"""Where the step runs — one process, DistributedDataParallel processes, or FSDP2 shards — as
one small interface, so the loop is the same for all three.

* :class:`OneProcess` (:class:`Placement` itself): the step as it is (``nn.DataParallel`` with
  ``data_parallel`` and several GPUs), a per-process non-finite guard, one ``.state.pt``.
* :class:`Distributed`: ``DistributedDataParallel`` under torchrun; rank 0 writes the files,
  every rank stops at the same non-finite check (an all-reduce) and at rank 0's early-stopping
  decision (a broadcast).
* :class:`Sharded`: FSDP2 (:mod:`._fsdp`): the models are sharded before any state is read, the
  weights are gathered to rank 0 for ``gs{step}.pkl``, the full state is a sharded
  ``torch.distributed.checkpoint`` directory every rank writes its part of, and every rank
  evaluates early stopping's metric (calling a sharded model is a collective).

What the loop asks of a placement: :meth:`~Placement.join` the process group,
:meth:`~Placement.prepare` the models (shard, point the optimizer), :meth:`~Placement.wrap` the
step, the :meth:`~Placement.guard`, the :meth:`~Placement.weights_to_save` (gathered), the
:meth:`~Placement.read_state` / :meth:`~Placement.write_state`, :meth:`~Placement.agree` on a
decision, :meth:`~Placement.barrier`, :meth:`~Placement.close`.

:func:`placement_for` picks one from the :class:`~purekd.TrainingConfig` (``fsdp`` set: sharded;
a local rank from torchrun or the config: DDP; else one process). :func:`join_process_group`
is the one call that joins torchrun's process group for a config (what :meth:`Placement.join`
does), usable before training starts (e.g. to build a ``DistributedSampler``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from purekd.configs._training import TrainingConfig

from . import _distributed as distributed
from . import _fsdp as fsdp
from . import _state as state
from ._guard import AllRanksNonFiniteGuard, NonFiniteGuard


def join_process_group(config: TrainingConfig) -> None:
    """Join torchrun's default process group when ``config`` runs distributed (a local rank
    from the config or ``LOCAL_RANK``, or ``fsdp`` set); nothing otherwise. FSDP outside a
    distributed launch is an error naming the fix."""
    local_rank = distributed.local_rank_from(config.local_rank)
    if config.fsdp is not None and local_rank == -1 and not distributed.is_initialized():
        raise ValueError(
            "TrainingConfig.fsdp is set but this process is not part of a distributed run: "
            "launch it with torchrun --nproc-per-node N (which sets LOCAL_RANK), or call "
            "torch.distributed.init_process_group first")
    if local_rank != -1 or config.fsdp is not None:
        distributed.ensure_process_group(config.device)


class Placement:
    """One process: the base of the other placements (each overrides what differs)."""

    def __init__(self, config: TrainingConfig):
        self.config = config
        self.device = torch.device(config.device)

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return distributed.rank() == 0

    def join(self) -> None:
        """Join the process group (before anything asks for the rank)."""
        join_process_group(self.config)

    def prepare(self, step: nn.Module, student: nn.Module,
                optimizer: torch.optim.Optimizer) -> None:
        """Place the models before any state is read (a sharded state loads into shards)."""

    def clean(self, output_dir: Path) -> None:
        """Remove what a write killed half-way left in ``output_dir`` (rank 0)."""
        from ._checkpoint import remove_temporary_files

        if self.is_main:
            remove_temporary_files(output_dir)

    def fingerprint(self) -> dict[str, Any]:
        """This placement's part of the run's fingerprint (the training options)."""
        return {}

    def fingerprint_parts(self, describe: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """The run's other fingerprint parts (the configs, the data) as this placement records
        them."""
        return describe

    def read_state(self, resume_from: str | os.PathLike[str], current: Mapping[str, Any],
                   step: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                   extend: bool) -> dict[str, Any]:
        """The state to resume from, checked against the run (:func:`._state.read`) and
        validated against its objects before anything is loaded."""
        saved, path = state.read(resume_from, current, extend=extend)
        state.validate(saved, path, step, optimizer, scheduler)
        return saved

    def wrap(self, step: nn.Module) -> Any:
        """The step as the loop calls it (after the state is restored)."""
        if self.config.data_parallel and torch.cuda.device_count() > 1:
            return nn.DataParallel(step)
        return step

    def guard(self) -> NonFiniteGuard:
        """The non-finite guard of this placement."""
        return NonFiniteGuard()

    def weights_to_save(self, student: nn.Module) -> dict[str, Any] | None:
        """The student's whole state dict on the process that writes ``gs{step}.pkl``, ``None``
        on the others (a collective where the weights are sharded)."""
        return student.state_dict() if self.is_main else None

    def barrier(self) -> None:
        """Wait for every process (after a checkpoint is written)."""

    def write_state(self, captured: dict[str, Any], step: nn.Module,
                    optimizer: torch.optim.Optimizer, output_dir: Path, run_id: str,
                    keep_last: int | None) -> None:
        """Write the full state (rank 0: one file) and prune the run's older ones."""
        if not self.is_main:
            return
        state.write(captured, output_dir)
        if keep_last is not None:
            state.prune(output_dir, run_id, keep_last)

    @property
    def shards_state(self) -> bool:
        """Whether every rank writes its shards of the state (:func:`._state.capture`)."""
        return False

    @property
    def writes_state(self) -> bool:
        """Whether this process takes part in writing the full state."""
        return self.is_main or self.shards_state

    @property
    def evaluates_everywhere(self) -> bool:
        """Whether every rank evaluates early stopping's metric (calling a sharded model is a
        collective); otherwise rank 0 alone does."""
        return False

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        return flag

    def close(self) -> None:
        """Undo what :meth:`prepare` installed for training only."""


OneProcess = Placement


class Distributed(Placement):
    """DistributedDataParallel over torchrun's processes: rank 0 writes the files, every rank
    stops at the same non-finite check and at rank 0's early-stopping decision."""

    def wrap(self, step: nn.Module) -> Any:
        local_rank = distributed.local_rank_from(self.config.local_rank)
        return distributed.wrap(step, self.config.device, local_rank)

    def guard(self) -> NonFiniteGuard:
        return AllRanksNonFiniteGuard(self.device)

    def barrier(self) -> None:
        distributed.barrier()

    def agree(self, flag: bool) -> bool:
        return distributed.broadcast_flag(flag, self.device)


class Sharded(Distributed):
    """FSDP2 (:mod:`._fsdp`): the student, the step and the teachers sharded in place before any
    state is read; weights gathered to rank 0 for ``gs{step}.pkl``; the full state a sharded
    ``torch.distributed.checkpoint`` directory every rank writes its part of."""

    def __init__(self, config: TrainingConfig):
        super().__init__(config)
        self.sharding: fsdp.ShardedModels | None = None

    def prepare(self, step: nn.Module, student: nn.Module,
                optimizer: torch.optim.Optimizer) -> None:
        assert self.config.fsdp is not None
        names = fsdp.parameter_names(step)
        self.sharding = fsdp.shard_models(step, student, self.config.fsdp, device=self.device,
                                          bf16=self.config.bf16)
        fsdp.rebind_optimizer(optimizer, names, step)

    def clean(self, output_dir: Path) -> None:
        super().clean(output_dir)
        if self.is_main:
            from ._sharded_state import remove_temporary_directories

            remove_temporary_directories(output_dir)

    def fingerprint(self) -> dict[str, Any]:
        assert self.config.fsdp is not None
        return {"fsdp": self.config.fsdp.to_dict()}

    def fingerprint_parts(self, describe: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        # the global batch, not the per-process one: a sharded state resumes on another
        # number of processes with the same global batches
        return fsdp.global_batches(describe, distributed.world_size())

    def read_state(self, resume_from: str | os.PathLike[str], current: Mapping[str, Any],
                   step: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                   extend: bool) -> dict[str, Any]:
        saved, _ = state.read_sharded(resume_from, current, step, optimizer, scheduler,
                                      extend=extend)
        return saved

    def wrap(self, step: nn.Module) -> Any:
        return step

    def weights_to_save(self, student: nn.Module) -> dict[str, Any] | None:
        weights = fsdp.full_state_dict(student)  # every rank gathers
        return weights if self.is_main else None

    def write_state(self, captured: dict[str, Any], step: nn.Module,
                    optimizer: torch.optim.Optimizer, output_dir: Path, run_id: str,
                    keep_last: int | None) -> None:
        state.write_sharded(captured, step, optimizer, output_dir)  # every rank its shards
        if keep_last is not None and self.is_main:
            from ._sharded_state import prune_sharded

            prune_sharded(output_dir, run_id, keep_last)

    @property
    def shards_state(self) -> bool:
        return True

    @property
    def evaluates_everywhere(self) -> bool:
        return True

    def close(self) -> None:
        if self.sharding is not None:
            self.sharding.close()


def placement_for(config: TrainingConfig) -> Placement:
    """The placement ``config`` asks for: FSDP2 when ``fsdp`` is set, DDP under torchrun (or
    with ``local_rank`` set), else one process."""
    if config.fsdp is not None:
        return Sharded(config)
    if distributed.local_rank_from(config.local_rank) != -1:
        return Distributed(config)
    return OneProcess(config)


__all__ = ["Distributed", "OneProcess", "Placement", "Sharded", "join_process_group",
           "placement_for"]
