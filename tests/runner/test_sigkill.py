"""A training process killed with SIGKILL resumes, in a fresh process, to the weights of an
uninterrupted run — bit for bit.

The child script trains a GeneralDistiller (shuffled loader, accumulation, Adam, StepLR,
dropout, a weight schedule, clipping) for 12 steps with a checkpoint and a full state every other
step. The interrupted run is killed twice: at step 6 from the callback (the state of that step is
never written), then — resumed from step 4 — in the middle of writing the state file of step 10
(a partial temporary file is left behind); resumed from step 8 it runs to the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ._helpers import assert_state_equal

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import os, random, signal, sys
    import numpy as np
    import torch
    from torch.utils.data import DataLoader
    import purekd
    from tests.runner._helpers import Tiny, adaptor, dataset, general_config, models

    # argv: output dir, result file, "resume" or "fresh", how to die: "callback:<step>",
    # "save:<step>" or "never"
    out, result, start, death = sys.argv[1:5]
    resume = start == "resume"
    how, _, when = death.partition(":")
    kill_at = int(when or 0)
    torch.set_num_threads(1)
    seed = 99 if resume else 7  # other seeds when resuming: the state restores the generators
    torch.manual_seed(seed); random.seed(seed); np.random.seed(seed)

    if how == "save":  # die half-way through writing the state file of step kill_at
        real_save = torch.save
        def dying_save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("counters", {}).get("global_step") == kill_at:
                f.write(b"PK\\x03\\x04 partial state")
                f.flush(); os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = dying_save

    def callback(model, step):
        if how == "callback" and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    teacher, student = models(seed=0, dropout=0.3)
    if resume:  # other initial weights: the state supplies them
        torch.manual_seed(1234); student = Tiny(6, 2, dropout=0.3)
    config = purekd.TrainingConfig(device="cpu", output_dir=out, gradient_accumulation_steps=2,
                                   ckpt_frequency=2)
    distill = general_config(kd_loss_weight_scheduler="linear_decay")
    distiller = purekd.GeneralDistiller(config, distill, teacher, student, adaptor, adaptor,
                                        compile=False)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-2)
    data = DataLoader(dataset(18), batch_size=2, shuffle=True,
                      generator=torch.Generator().manual_seed(3))
    with distiller:
        distiller.train(optimizer, data, num_epochs=3, max_grad_norm=1.0, callback=callback,
                        scheduler_class=torch.optim.lr_scheduler.StepLR,
                        scheduler_args={"step_size": 3, "gamma": 0.5},
                        save_state=True, resume_from=out if resume else None)
    weights = {"student." + k: v for k, v in student.state_dict().items()}
    weights.update({"proj." + k: v for k, v in distiller.projs[0].state_dict().items()})
    torch.save(weights, result)
''')

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def _run(script: Path, out: Path, result: Path, start: str,
         death: str) -> subprocess.CompletedProcess:
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(script), str(out), str(result), start, death],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def _assert_killed(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr[-2000:])


def _states(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("gs*.state.pt"))


def test_sigkilled_run_resumes_bit_identically(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    full = _run(script, tmp_path / "full", tmp_path / "full.pt", "fresh", "never")
    assert full.returncode == 0, full.stderr[-2000:]
    expected = torch.load(tmp_path / "full.pt", weights_only=True)

    out, result = tmp_path / "out", tmp_path / "resumed.pt"
    _assert_killed(_run(script, out, result, "fresh", "callback:6"))
    assert _states(out) == ["gs2.state.pt", "gs4.state.pt"]  # the state of step 6: never written
    assert (out / "gs6.pkl").exists()

    _assert_killed(_run(script, out, result, "resume", "save:10"))
    names = {p.name for p in out.iterdir()}
    assert _states(out) == ["gs2.state.pt", "gs4.state.pt", "gs6.state.pt", "gs8.state.pt"]
    assert [n for n in names if n.endswith(".tmp")], names  # the half-written state file
    assert not result.exists()
    for step in (2, 4, 6, 8, 10):  # every checkpoint on disk is whole
        torch.load(out / f"gs{step}.pkl", weights_only=True)

    done = _run(script, out, result, "resume", "never")  # from gs8.state.pt, ignoring the .tmp
    assert done.returncode == 0, done.stderr[-2000:]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # removed at start
    assert_state_equal(torch.load(result, weights_only=True), expected)
    assert_state_equal(torch.load(out / "gs12.pkl", weights_only=True),
                       torch.load(tmp_path / "full" / "gs12.pkl", weights_only=True))
