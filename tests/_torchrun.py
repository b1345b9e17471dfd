"""Launch a script on two local processes with ``torchrun`` (gloo), as the distributed tests do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun(script: Path | str, *args: str, launcher: tuple[str, ...] = (),
             timeout: float = 240, stderr_tail: int = 3000, processes: int = 2,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``script args`` on ``processes`` processes (``--standalone``, one OpenMP thread
    each, the repository importable) and assert it succeeded, showing the tail of its output if
    not. ``launcher``: further ``torchrun`` options (e.g. ``--max-restarts=1``); ``cwd``: the
    working directory (default: the repository)."""
    env = {key: value for key, value in os.environ.items() if key not in _LAUNCH_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}", "--standalone",
         *launcher, str(script), *args],
        cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-stderr_tail:]
    return done
