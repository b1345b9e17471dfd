"""DistributedDataParallel on two CPU processes (gloo, launched by torchrun) equals one process
on the combined batch: with mean losses, DDP's gradient averaging is the gradient of the mean
over both halves. Only rank 0 writes checkpoints and metrics."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import purekd

from .._torchrun import torchrun
from ._helpers import adaptor, checkpoints, dataset, models, train_config

SAMPLES, PER_RANK_BATCH, EPOCHS = 16, 2, 2

DISTILL = {
    "temperature": 2,
    "hard_label_weight": 0.5,
    "intermediate_matches": [  # hidden_mse without a mask: a plain mean
        {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
         "proj": ["linear", 6, 8]},
    ],
}

SCRIPT = textwrap.dedent(f'''
    import os, sys
    import torch
    from torch.utils.data import DataLoader, DistributedSampler
    import purekd
    import purekd.runner._loop as loop
    from tests.runner._helpers import adaptor, dataset, models

    saves, loggers = [], []  # what this rank wrote with atomic_save; its loggers' enabled flags
    real_save, real_logger = loop.atomic_save, loop.MetricsLogger
    def atomic_save(obj, path):
        saves.append(os.path.basename(path))
        return real_save(obj, path)
    def metrics_logger(*args, **kwargs):
        logger = real_logger(*args, **kwargs)
        loggers.append(logger.enabled)
        return logger
    loop.atomic_save, loop.MetricsLogger = atomic_save, metrics_logger

    out, result = sys.argv[1:3]
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    assert os.environ["LOCAL_RANK"] == str(rank)
    teacher, student = models(seed=0)
    torch.manual_seed(1)  # the projection's initial weights
    distiller = purekd.GeneralDistiller(
        purekd.TrainingConfig(device="cpu", output_dir=out), {DISTILL!r}, teacher, student,
        adaptor, adaptor, compile=False)
    data = dataset({SAMPLES})
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    steps = []
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.5),
                        DataLoader(data, batch_size={PER_RANK_BATCH}, sampler=sampler),
                        num_epochs={EPOCHS}, save_state=True,
                        callback=lambda model, step: steps.append(step))
    weights = {{"student." + k: v for k, v in student.state_dict().items()}}
    weights.update({{"proj." + k: v for k, v in distiller.projs[0].state_dict().items()}})
    torch.save({{"weights": weights, "steps": steps, "saves": saves, "loggers": loggers,
                "world": torch.distributed.get_world_size()}}, f"{{result}}.rank{{rank}}")
''')

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is unavailable")


def _single_process(out: Path) -> dict[str, torch.Tensor]:
    teacher, student = models(seed=0)
    torch.manual_seed(1)
    distiller = purekd.GeneralDistiller(train_config(out), DISTILL, teacher, student, adaptor,
                                        adaptor, compile=False)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.5),
                        DataLoader(dataset(SAMPLES), batch_size=2 * PER_RANK_BATCH),
                        num_epochs=EPOCHS)
    weights = {f"student.{k}": v for k, v in student.state_dict().items()}
    weights.update({f"proj.{k}": v for k, v in distiller.projs[0].state_dict().items()})
    return weights


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Train with torchrun on two processes; the output dir and what each rank reported."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    out, result = tmp_path / "out", tmp_path / "result"
    torchrun(script, str(out), str(result))
    return out, [torch.load(f"{result}.rank{r}", weights_only=True) for r in (0, 1)]


STEPS_PER_EPOCH = SAMPLES // (2 * PER_RANK_BATCH)
CKPT_STEPS = [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]


def test_two_processes_equal_one_process_on_the_combined_batch(ddp_run, tmp_path: Path) -> None:
    out, ranks = ddp_run
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["steps"] for r in ranks] == [CKPT_STEPS, CKPT_STEPS]  # callbacks on every rank

    expected = _single_process(tmp_path / "single")
    for rank in ranks:  # both ranks hold the same weights, those of the single process
        assert rank["weights"].keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(rank["weights"][key], value, atol=1e-5, rtol=0,
                                       msg=lambda m, k=key: f"{k}: {m}")

    # checkpoints: written by rank 0 only; the shared folder holds a single run's file set
    assert [n for n in ranks[1]["saves"] if n.endswith(".pkl")] == []
    assert [n for n in ranks[0]["saves"] if n.endswith(".pkl")] == [f"gs{s}.pkl" for s in CKPT_STEPS]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([*(f"gs{s}.pkl" for s in CKPT_STEPS),
                            *(f"gs{s}.state.pt" for s in CKPT_STEPS), "metrics.jsonl",
                            "run.json"])
    assert checkpoints(out) == sorted(f"gs{s}.pkl" for s in CKPT_STEPS)
    final = torch.load(out / f"gs{CKPT_STEPS[-1]}.pkl", weights_only=True)
    for key, value in final.items():
        torch.testing.assert_close(value, expected[f"student.{key}"], atol=1e-5, rtol=0)


def test_only_rank_0_writes_state_files_and_metrics(ddp_run) -> None:
    out, ranks = ddp_run
    assert ranks[1]["saves"] == [] and ranks[1]["loggers"] == [False]
    assert ranks[0]["loggers"] == [True]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS_PER_EPOCH * EPOCHS  # rank 0's micro-batches only


def test_the_logged_gradient_norm_is_that_of_the_combined_batch(ddp_run, tmp_path: Path) -> None:
    """Rank 0's records: the gradient norm after DDP's averaging equals one process's on the
    combined batch, step by step; so do the learning rates."""
    out, _ = ddp_run
    _single_process(tmp_path / "single")
    ddp = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in
           (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in ddp] == [r["global_step"] for r in one]
    assert [r["lr"] for r in ddp] == [r["lr"] for r in one]
    assert [r["grad_norm"] for r in ddp] == pytest.approx([r["grad_norm"] for r in one],
                                                          rel=1e-5)


GUARD_SCRIPT = textwrap.dedent(f'''
    import os, sys
    import torch
    from torch.utils.data import DataLoader, DistributedSampler
    import purekd
    from tests.runner._helpers import adaptor, dataset, models

    out, result = sys.argv[1:3]
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    calls = []

    def poisoned(batch, outputs):
        """Rank 1's third micro-batch: a hard-label loss whose value is NaN and whose gradient
        is finite (a NaN constant added), so rank 0's loss and gradients stay finite."""
        result = adaptor(batch, outputs)
        calls.append(1)
        if rank == 1 and len(calls) == 3 and "losses" in result:
            result["losses"] = result["losses"] + torch.tensor(float("nan"))
        return result

    teacher, student = models(seed=0)
    config = purekd.TrainingConfig(device="cpu", output_dir=out, ckpt_steps=2)
    purekd.runner.join_process_group(config)  # for the DistributedSampler
    distiller = purekd.GeneralDistiller(config, {DISTILL!r}, teacher, student, adaptor,
                                        poisoned, compile=False)
    data = dataset({SAMPLES})
    sampler = DistributedSampler(data, shuffle=False)
    try:
        with distiller:
            distiller.train(torch.optim.SGD(student.parameters(), lr=0.5),
                            DataLoader(data, batch_size={PER_RANK_BATCH}, sampler=sampler),
                            num_steps=6)
        outcome = "finished"
    except purekd.runner.NonFiniteLossError as error:
        outcome = str(error)
    torch.save({{"outcome": outcome}}, f"{{result}}.rank{{rank}}")
''')


def test_a_nan_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    """Only rank 1 sees a non-finite loss (its gradient, and so rank 0's, stay finite): both
    ranks stop at the same step with NonFiniteLossError — rank 1 naming the term, rank 0 saying
    it was another rank — instead of rank 0 waiting in its next collective until the process
    group times out; no checkpoint is written from that step on."""
    script = tmp_path / "guard.py"
    script.write_text(GUARD_SCRIPT)
    out, result = tmp_path / "out", tmp_path / "result"
    torchrun(script, str(out), str(result), timeout=180)
    outcomes = [torch.load(f"{result}.rank{r}", weights_only=True)["outcome"] for r in (0, 1)]
    assert outcomes[1].startswith("the loss is not finite at global step 3 (term "
                                  "'hard_label_loss'"), outcomes[1]
    assert outcomes[0].startswith("the loss is not finite at global step 3 on another rank"), \
        outcomes[0]
    assert checkpoints(out) == ["gs2.pkl"]
