"""The torchrun worker of ``test_reshard.py``: a sharded state written by 2 processes resumes on
1, and one written by 1 process resumes on 2 (FSDP2, gloo, the fused output layer, AdamW).

``_reshard.py WORK PHASE`` with PHASE

* ``two`` (2 processes): a run saving a state at every step, to the end — ``WORK/two``;
* ``one`` (1 process): the state of step ``FROM`` of ``two`` resumed with the per-process
  batch of 2 processes (the global batch halves: refused, the message kept in
  ``WORK/refused.txt``), then with the same global batch — ``WORK/two-to-one``; then a run of
  its own, saving states — ``WORK/one``;
* ``two-again`` (2 processes): the state of step ``FROM`` of ``one`` resumed — ``WORK/one-to-two``.

Each run leaves rank 0's gathered final weights in ``WORK/<run>.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from tests.composition import _matrix as matrix

COMBO = matrix.Combo("fused", "shard")
FROM = 2  # of matrix.STEPS = 4


def main(work: Path, phase: str) -> None:
    from purekd.losses import _blockwise
    from purekd.runner import StateError

    torch.set_num_threads(1)
    _blockwise.COMPILE_BLOCKS = False
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    def run(name: str, **options: object) -> None:
        weights = matrix.train(COMBO, work / name, world=world, rank=rank, adamw=True,
                               **options)  # type: ignore[arg-type]
        if rank == 0:
            torch.save(weights, work / f"{name}.pt")

    if phase == "two":
        run("two", save_state=True)
    elif phase == "one":
        state = work / "two" / f"gs{FROM}.state"
        try:
            run("refused", resume_from=state, per_micro=matrix.GLOBAL_BATCH // 2)
        except StateError as error:
            (work / "refused.txt").write_text(str(error))
        run("two-to-one", resume_from=state)
        run("one", save_state=True)
    elif phase == "two-again":
        run("one-to-two", resume_from=work / "one" / f"gs{FROM}.state")
    else:
        raise SystemExit(f"unknown phase {phase!r}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
