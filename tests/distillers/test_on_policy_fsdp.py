"""On-policy distillation under FSDP2 on two gloo ranks (``_on_policy_fsdp_worker.py``): the
student and teacher sharded, each rank sampling completions of its own prompts, the KD loss
normalised by the sampled tokens of both ranks — the weights equal those of one process
distilling on every prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from .._torchrun import torchrun

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is unavailable")


def test_two_sharded_ranks_equal_one_process(tmp_path):
    import purekd

    from . import _on_policy_fsdp_worker as worker

    torchrun(Path(worker.__file__), str(tmp_path), timeout=400)
    got = torch.load(tmp_path / "weights.pt", weights_only=True)
    config = purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path / "one"),
                                   ckpt_steps=worker.STEPS)
    distiller = worker.distil(config, worker.batches(None))
    expected = distiller.step.state_dict()
    tensors = {k: v for k, v in expected.items() if isinstance(v, torch.Tensor)}
    assert {k for k in got if k.startswith("student.")} == {
        k for k in tensors if k.startswith("student.")}
    initial = worker.tiny_llama(1, 8, seed=1).state_dict()
    moved = 0
    for key, value in tensors.items():
        if key.startswith("student."):
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-10,
                                       msg=lambda m, k=key: f"{k}: {m}")
            moved += not torch.allclose(value, initial[key[len("student."):]], atol=1e-6)
    assert moved > 0  # training changed the weights: the equality is not that of two no-ops
