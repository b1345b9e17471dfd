"""A writer killed with SIGKILL resumes, in a fresh process, to a cache byte-identical to one
written in one go.

The child writes 21 samples, 3 a shard, in batches of 2 (shards and batches do not line up).
The interrupted writer is killed twice: half-way through writing a shard's rows file (a partial
temporary file is left behind), then — resumed — right after a shard's files are in place but
before its progress entry is (the shard is on disk but not listed); resumed again it finishes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ._helpers import files

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import numpy as np
    import torch
    import purekd.teacher_cache._format as fmt
    from tests.teacher_cache._helpers import TinyLM, Tokens, write

    out, death = sys.argv[1:3]
    how, _, when = death.partition(":")
    kill_at = int(when or 0)
    torch.set_num_threads(1)
    calls = []
    real_save, real_json = np.save, fmt.save_json

    def dying_save(file, array, *args, **kwargs):  # the N-th array file dies half-written
        calls.append(getattr(file, "name", "?"))
        if how == "mid-write" and len(calls) == kill_at:
            file.write(b"\\x93NUMPY partial")
            file.flush(); os.fsync(file.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(file, array, *args, **kwargs)

    def dying_json(path, value):  # dies before the N-th progress file is written
        if how == "before-progress" and str(path).endswith("progress.json"):
            calls.append(path)
            if sum(str(c).endswith("progress.json") for c in calls) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_json(path, value)

    fmt.np.save, fmt.save_json = dying_save, dying_json
    write(TinyLM(seed=0), Tokens(21, seed=2), out, k=5, values="q8", shard_samples=3,
          batch_size=2, tokenizer=["a", "b"])
''')

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def _run(script: Path, out: Path, death: str) -> subprocess.CompletedProcess:
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), str(out), death], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)


def test_sigkilled_writer_resumes_to_a_byte_identical_cache(tmp_path: Path) -> None:
    script = tmp_path / "write.py"
    script.write_text(SCRIPT)
    full = _run(script, tmp_path / "full", "never")
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "out"
    killed = _run(script, out, "mid-write:5")  # shard 0 (2 files) and 1 done, shard 2's rows
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert any(n.endswith(".tmp") for n in names), names
    assert "manifest.json" not in names

    killed = _run(script, out, "before-progress:3")  # shards 2, 3, 4 written; 4 not listed
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert "rank00000-shard00004.rows.npy" in names and "manifest.json" not in names
    assert not any(n.endswith(".tmp") for n in names), names  # the resumed writer cleaned up

    done = _run(script, out, "never")
    assert done.returncode == 0, done.stderr[-2000:]
    expected = files(tmp_path / "full")
    assert sorted(expected) == sorted(p.name for p in out.iterdir())
    assert files(out) == expected
