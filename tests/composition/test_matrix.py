"""The composition matrix (``_matrix.py``): every KD form under every placement, precision,
accumulation and a SIGKILL + resume, each against the plain reference — one process, fp32, no
accumulation, on the same global batches — or refused with an error naming both features.

* fp32, any placement and accumulation: the reference's weights within ``FP32_ATOL`` (float
  sums in another order);
* bf16 (autocast; FSDP2's bf16 gathers with fp32 reductions): within ``BF16_ATOL`` of the fp32
  reference, by form (the weights themselves move by ~5e-2 for the top-k forms, 3e-3 for the
  others);
* killed while a state is written and resumed: exactly the weights of the same run
  uninterrupted;
* ``FSDPConfig(teacher="none")`` with a form that needs the teacher (logits, fused): refused at
  the first batch, before any weight changes, naming the placement and the missing cache; with
  an on-policy form: refused when the distiller is built.

The on-policy forms (greedy sampling, completions of different lengths) run in a launch of their
own: every placement but ``none`` against their plain reference, a SIGKILLed FSDP2 run resumed
to the uninterrupted weights, and one process with accumulation.

The default suite covers each axis at least once with every KD form; the whole product of
forms x placements x precisions x accumulations runs under ``-m slow`` (about 4 minutes on two
busy CPU cores, measured).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from .._torchrun import REPO, torchrun

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is unavailable")

from . import _matrix as matrix  # noqa: E402  (needs transformers)

FP32_ATOL = 1e-7  # measured at most 7.5e-9 (the weights move by 3e-3 to 5e-2)
BF16_ATOL = {"logits": 5e-5, "fused": 5e-5,  # measured at most 1.0e-5 (weights move by 3e-3)
             "topk": 1e-3, "fused+topk": 1e-3}  # measured at most 2.4e-4 (weights move by 5e-2)

NEEDS_TEACHER = ("logits", "fused")  # placement "none" refuses these
ALL_FORMS = (*matrix.FORMS, *matrix.ON_POLICY_FORMS)
DEFAULT = [
    *(f"{form}-{placement}-fp32-acc1" for form in matrix.FORMS for placement in ("ddp", "replicate")),
    *(f"{form}-shard-fp32-acc2" for form in matrix.FORMS),
    *(f"{form}-shard-bf16-acc1" for form in matrix.FORMS),
    *(f"{form}-ddp-bf16-acc2" for form in matrix.FORMS),
    "topk-none-fp32-acc1", "fused+topk-none-bf16-acc2",
    "logits-none-fp32-acc1", "fused-none-fp32-acc1",
    "logits-keep-fp32-acc1", "fused-keep-fp32-acc2", "fused+topk-keep-bf16-acc1",
]
KILLED = ["logits-ddp-fp32-acc1+kill", "topk-shard-fp32-acc2+kill", "fused-shard-fp32-acc2+kill",
          "fused+topk-none-bf16-acc2+kill"]
ON_POLICY = ["onpolicy-ddp-fp32-acc1", "onpolicy-shard-fp32-acc2", "onpolicy-none-fp32-acc1",
             "onpolicy+fused-replicate-fp32-acc1", "onpolicy+fused-ddp-fp32-acc2",
             "onpolicy+fused-keep-fp32-acc2", "onpolicy+fused-shard-fp32-acc1"]
ON_POLICY_KILLED = ["onpolicy+fused-shard-fp32-acc1+kill"]
SINGLE = [*(f"{form}-single-fp32-acc2" for form in ALL_FORMS),
          *(f"{form}-single-bf16-acc1" for form in matrix.FORMS)]
SINGLE_KILLED = ["fused-single-fp32-acc1+kill", "fused+topk-single-fp32-acc1+kill",
                 "onpolicy-single-fp32-acc1+kill"]
SWEEP = [f"{form}-{placement}-{precision}-acc{acc}" for form, placement, precision, acc in
         itertools.product(matrix.FORMS, matrix.DISTRIBUTED, ("fp32", "bf16"), (1, 2))]


@pytest.fixture(scope="module", autouse=True)
def _eager_blocks() -> Iterator[None]:
    from purekd.losses import _blockwise

    compile_, threads = _blockwise.COMPILE_BLOCKS, torch.get_num_threads()
    _blockwise.COMPILE_BLOCKS = False  # the same values, no compile time
    torch.set_num_threads(1)
    yield
    _blockwise.COMPILE_BLOCKS = compile_
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    work = tmp_path_factory.mktemp("references")
    return {form: matrix.reference(form, work / form) for form in ALL_FORMS}


def _launch(work: Path, names: list[str], killed: list[str]) -> Path:
    torchrun(Path(matrix.__file__), str(work), *names, *killed,
             launcher=(f"--max-restarts={len(killed)}",), timeout=590, stderr_tail=6000)
    return work


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _launch(tmp_path_factory.mktemp("matrix"), DEFAULT, KILLED)


@pytest.fixture(scope="module")
def launched_on_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _launch(tmp_path_factory.mktemp("on_policy"), ON_POLICY, ON_POLICY_KILLED)


def _report(work: Path, name: str) -> dict[str, object]:
    return torch.load(work / f"{name}.pt", weights_only=False)


def _difference(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert got.keys() == expected.keys()
    return max((got[k].float() - v).abs().max().item() for k, v in expected.items())


def _check(name: str, report: dict[str, object],
           references: dict[str, dict[str, torch.Tensor]]) -> None:
    combo = matrix.Combo.parse(name)
    if combo.placement == "none" and combo.on_policy:
        assert report.get("error", "").startswith(  # type: ignore[union-attr]
            "ValueError: DistillationConfig(on_policy=...) with TrainingConfig(fsdp=FSDPConfig("
            "teacher='none')): the teacher must score every newly sampled sequence"), \
            report.get("error")
        return
    if combo.placement == "none" and combo.form in NEEDS_TEACHER:
        assert report.get("error", "").startswith(  # type: ignore[union-attr]
            "ValueError: TrainingConfig.fsdp.teacher='none' but the teacher GPT2LMHeadModel was "
            "called: a batch had no cached teacher outputs"), report.get("error")
        return
    assert "error" not in report, report.get("traceback")
    atol = FP32_ATOL if combo.precision == "fp32" else BF16_ATOL[combo.form]
    difference = _difference(report["weights"], references[combo.form])  # type: ignore[arg-type]
    assert difference <= atol, f"{name}: {difference:.3g} from the reference (atol {atol})"


@pytest.mark.parametrize("name", DEFAULT)
def test_distributed_runs_equal_the_plain_reference(name: str, launched: Path,
                                                    references: dict[str, dict[str, torch.Tensor]]) -> None:
    _check(name, _report(launched, name), references)


@pytest.mark.parametrize("name", ON_POLICY)
def test_on_policy_distributed_runs_equal_the_plain_reference(
        name: str, launched_on_policy: Path,
        references: dict[str, dict[str, torch.Tensor]]) -> None:
    _check(name, _report(launched_on_policy, name), references)


@pytest.mark.parametrize("name", ON_POLICY_KILLED)
def test_a_sigkilled_on_policy_distributed_run_resumes_to_the_uninterrupted_weights(
        name: str, launched_on_policy: Path) -> None:
    test_a_sigkilled_distributed_run_resumes_to_the_uninterrupted_weights(name, launched_on_policy)


@pytest.mark.parametrize("name", KILLED)
def test_a_sigkilled_distributed_run_resumes_to_the_uninterrupted_weights(name: str,
                                                                           launched: Path) -> None:
    resumed = _report(launched, name)["weights"]
    uninterrupted = _report(launched, name.removesuffix("+kill"))["weights"]
    assert _difference(resumed, uninterrupted) == 0.0  # type: ignore[arg-type]
    out = launched / name
    assert (out / f"gs{matrix.STEPS}.pkl").is_file()


@pytest.mark.parametrize("name", SINGLE)
def test_one_process_runs_equal_the_plain_reference(name: str, tmp_path: Path,
                                                    references: dict[str, dict[str, torch.Tensor]]) -> None:
    weights = matrix.train(matrix.Combo.parse(name), tmp_path / "out")
    _check(name, {"weights": weights}, references)


@pytest.mark.parametrize("name", SINGLE_KILLED)
def test_a_sigkilled_process_resumes_to_the_reference(name: str, tmp_path: Path,
                                                      references: dict[str, dict[str, torch.Tensor]]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(Path(matrix.__file__)), str(tmp_path), name]
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILLed writing the state of KILL_AT
    assert not (tmp_path / name / f"gs{matrix.KILL_AT}.state.pt").exists()
    resumed = subprocess.run(command, env={**env, "TORCHELASTIC_RESTART_COUNT": "1"},
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    weights = _report(tmp_path, name)["weights"]
    assert _difference(weights, references[matrix.Combo.parse(name).form]) == 0.0  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_whole_product_equals_the_plain_reference(precision: str, tmp_path: Path,
                                                      references: dict[str, dict[str, torch.Tensor]]) -> None:
    names = [name for name in SWEEP if f"-{precision}-" in name]
    work = _launch(tmp_path, names, [])
    failures = []
    for name in names:
        try:
            _check(name, _report(work, name), references)
        except AssertionError as error:
            failures.append(f"{name}: {error}")
    for form, accumulation in itertools.product(matrix.FORMS, (1, 2)):
        name = f"{form}-single-{precision}-acc{accumulation}"
        weights = matrix.train(matrix.Combo.parse(name), tmp_path / name)
        try:
            _check(name, {"weights": weights}, references)
        except AssertionError as error:
            failures.append(f"{name}: {error}")
    assert not failures, "\n".join(failures)
