"""Sampling from an FSDP2-sharded model on two gloo ranks (``_sampler_fsdp_worker.py``): ranks
whose completions end at different lengths take the same number of decode steps (``synced_gpus``,
no deadlock), and each rank's rollout equals the one an unsharded copy of the model samples in
one process from the same prompts and seed; for ``HFGenerateSampler`` (``generate``'s
``synced_gpus``) and ``KVCacheSampler`` (its ranks all-reduce their unfinished rows each step)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from .._torchrun import torchrun

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is unavailable")


@pytest.mark.parametrize("sampler", ["generate", "kv_cache"])
def test_sharded_ranks_step_together_and_sample_what_one_process_samples(tmp_path, sampler):
    from . import _sampler_fsdp_worker as worker

    torchrun(Path(worker.__file__), str(tmp_path), sampler, timeout=300)
    reports = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    lengths = [int(r["sharded"][5].max()) for r in reports]
    assert lengths == [1, worker.MAX_NEW_TOKENS]  # rank 0 stopped at once, rank 1 ran on
    # the same number of forwards on both ranks: rank 0 kept stepping with rank 1
    assert reports[0]["forwards"] == reports[1]["forwards"] == worker.MAX_NEW_TOKENS
    for report in reports:
        for sharded, alone in zip(report["sharded"], report["alone"], strict=True):
            if sharded.is_floating_point():
                torch.testing.assert_close(sharded, alone, rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(sharded, alone)
