"""A recipe run in other processes: under torchrun on two gloo ranks it trains the student one
process trains (each rank half of every batch, the cache written half by each); killed with
SIGKILL mid-run, it resumes with ``checkpoint.resume=true`` to the uninterrupted run's weights,
bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from tests._torchrun import REPO, torchrun

MAIN = REPO / "purekd" / "__main__.py"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               TORCHDYNAMO_DISABLE="1")  # the fused loss's blocks eager: no compile time
    return env


def _write(recipe_data, path: Path, **sections) -> Path:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recipe_data.items()}
    for key, values in sections.items():
        data[key] = {**data.get(key, {}), **values}
    path.write_text(yaml.safe_dump(data))
    return path


def _distill(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, str(MAIN), "distill", *args, "--quiet"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _in_process(path: Path) -> None:
    """The reference run, here (the block kernels eager, as TORCHDYNAMO_DISABLE makes them in
    the other processes; the recipes say compile: false)."""
    from purekd.recipes import load
    from purekd.recipes._run import run

    run(load(path), progress_bar=False, echo=lambda _: None)


def _weights(folder: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(folder / f"gs{step}.pkl", weights_only=True)


def test_two_gloo_ranks_train_the_student_one_process_trains(recipe_data, tmp_path,
                                                             monkeypatch):
    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    one = _write(recipe_data, tmp_path / "one.yaml",
                 train={"batch_size": 4, "steps": 3},
                 checkpoint={"output_dir": str(tmp_path / "one"), "every": 3})
    two = _write(recipe_data, tmp_path / "two.yaml",
                 train={"batch_size": 2, "steps": 3},
                 checkpoint={"output_dir": str(tmp_path / "two"), "every": 3})
    _in_process(one)
    done = torchrun(MAIN, "distill", str(two), "--quiet")
    assert "held-out ppl" in done.stdout and done.stdout.count("held-out ppl") == 1  # rank 0
    a, b = _weights(tmp_path / "one", 3), _weights(tmp_path / "two", 3)
    assert a.keys() == b.keys()
    for name in a:
        # as the runner's distributed tests: the two halves' gradients are summed in another
        # order than one batch's (3e-6 measured after 3 Adam steps at lr 1e-2)
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "student")
    assert all(torch.equal(v, b[k]) for k, v in loaded.state_dict().items())


KILLING = textwrap.dedent('''
    import os, signal, sys
    import purekd.recipes._run as run_module
    from purekd.__main__ import main

    kill_at = int(sys.argv[1])
    made = run_module.export_callback

    def export_then_die(output_dir, tokenizer, sharded):
        save = made(output_dir, tokenizer, sharded)
        def callback(model, step):
            save(model=model, step=step)
            if step == kill_at:  # before the state of this step is written
                os.kill(os.getpid(), signal.SIGKILL)
        return callback

    run_module.export_callback = export_then_die
    sys.exit(main(sys.argv[2:]))
''')


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(recipe_data, tmp_path):
    sections = {"train": {"steps": 6, "accumulation": 2, "batch_size": 2},
                "schedule": {"name": "cosine", "warmup": 0.3}}
    whole = _write(recipe_data, tmp_path / "whole.yaml",
                   checkpoint={"output_dir": str(tmp_path / "whole"), "every": 2}, **sections)
    cut = _write(recipe_data, tmp_path / "cut.yaml",
                 checkpoint={"output_dir": str(tmp_path / "cut"), "every": 2}, **sections)
    _in_process(whole)
    script = tmp_path / "killing.py"
    script.write_text(KILLING)
    died = subprocess.run([sys.executable, str(script), "4", "distill", str(cut), "--quiet"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    out = tmp_path / "cut"
    assert (out / "gs2.state.pt").exists() and not (out / "gs4.state.pt").exists()
    assert not (out / "student").exists()
    _distill(str(cut), "checkpoint.resume=true")
    a, b = _weights(tmp_path / "whole", 6), _weights(out, 6)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out / "student")
    assert all(torch.equal(v, a[k]) for k, v in loaded.state_dict().items())


def test_fsdp_on_two_gloo_ranks_writes_the_gathered_student(recipe_data, tmp_path,
                                                            monkeypatch):
    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    # both through the fused output layer (gathered whole under FSDP2): equal to float noise,
    # which Adam's first steps scale up to the learning rate (1.2e-5 measured at lr 1e-2): a
    # smaller one here
    one = _write(recipe_data, tmp_path / "one.yaml", train={"batch_size": 4, "steps": 2},
                 optimizer={"lr": 1e-3},
                 checkpoint={"output_dir": str(tmp_path / "one"), "every": 2,
                             "save_state": False})
    two = _write(recipe_data, tmp_path / "two.yaml",
                 train={"batch_size": 2, "steps": 2, "fsdp": True}, optimizer={"lr": 1e-3},
                 checkpoint={"output_dir": str(tmp_path / "two"), "every": 2,
                             "save_state": False})
    _in_process(one)
    torchrun(MAIN, "distill", str(two), "--quiet")
    a, b = _weights(tmp_path / "one", 2), _weights(tmp_path / "two", 2)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)
    from transformers import AutoModelForCausalLM

    for folder in ("student-gs2", "student"):  # gathered on rank 0, whole
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / folder)
        assert all(torch.equal(v, b[k]) for k, v in loaded.state_dict().items()), folder


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_an_on_policy_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(
        recipe_data, data_files, tmp_path):
    """lmbda 0.5 (sampled and data batches), sampling at 0.9: the resumed run draws the same
    lmbda decisions and the same samples (the generator travels with the saved state)."""
    sections = {"teacher": {"source": "on_policy"},
                "data": {"path": str(data_files["pc"]), "format": "prompt_completion",
                         "packing": False, "seq_len": 32, "eval_rows": 0},
                "loss": {"kd_loss_type": "reverse_kl", "ce_weight": 0.0},
                "on_policy": {"lmbda": 0.5, "max_new_tokens": 5, "temperature": 0.9,
                              "seed": 2},
                "train": {"steps": 6, "batch_size": 2, "accumulation": 2}}
    whole = _write(recipe_data, tmp_path / "whole.yaml",
                   checkpoint={"output_dir": str(tmp_path / "whole"), "every": 2}, **sections)
    cut = _write(recipe_data, tmp_path / "cut.yaml",
                 checkpoint={"output_dir": str(tmp_path / "cut"), "every": 2}, **sections)
    _distill(str(whole))  # a process like the killed one: same threads, same kernels
    script = tmp_path / "killing.py"
    script.write_text(KILLING)
    died = subprocess.run([sys.executable, str(script), "4", "distill", str(cut), "--quiet"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    out = tmp_path / "cut"
    assert (out / "gs2.state.pt").exists() and not (out / "gs4.state.pt").exists()
    _distill(str(cut), "checkpoint.resume=true")
    a, b = _weights(tmp_path / "whole", 6), _weights(out, 6)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"],
                           _weights(tmp_path / "whole", 2)["model.layers.0.mlp.up_proj.weight"])


def test_an_on_policy_recipe_on_two_gloo_ranks_trains_the_student_one_process_trains(
        recipe_data, data_files, tmp_path, monkeypatch):
    """Greedy sampling (top_k 1; with random sampling the draws depend on how a batch is split
    between processes): each rank samples its half of every batch's prompts, completions of
    different lengths; the loss normalised by the sampled tokens of all ranks."""
    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    sections = {"teacher": {"source": "on_policy"},
                "data": {"path": str(data_files["pc"]), "format": "prompt_completion",
                         "packing": False, "seq_len": 32, "eval_rows": 0},
                "loss": {"kd_loss_type": "reverse_kl", "ce_weight": 0.0},
                "on_policy": {"lmbda": 1.0, "max_new_tokens": 5, "top_k": 1}}
    one = _write(recipe_data, tmp_path / "one.yaml", train={"batch_size": 4, "steps": 3},
                 checkpoint={"output_dir": str(tmp_path / "one"), "every": 3,
                             "save_state": False}, **sections)
    two = _write(recipe_data, tmp_path / "two.yaml", train={"batch_size": 2, "steps": 3},
                 checkpoint={"output_dir": str(tmp_path / "two"), "every": 3,
                             "save_state": False}, **sections)
    _distill(str(one))  # in its own process, as the ranks are (threads and kernels alike)
    torchrun(MAIN, "distill", str(two), "--quiet")
    a, b = _weights(tmp_path / "one", 3), _weights(tmp_path / "two", 3)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)
