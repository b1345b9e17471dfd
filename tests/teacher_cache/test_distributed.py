"""Two gloo processes (torchrun) write one cache: each rank its own shards from a shuffled
DistributedSampler (which repeats a sample to even out the ranks); the reader sees one cache
holding every sample once, each under its own id."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from purekd.teacher_cache import TeacherCache

from .._torchrun import torchrun
from ._helpers import TinyLM, Tokens, exact_topk

SAMPLES, K = 15, 6

SCRIPT = textwrap.dedent(f'''
    import sys
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler
    from purekd.teacher_cache import WithSampleIds, write_teacher_cache
    from tests.teacher_cache._helpers import TinyLM, Tokens, live_adaptor, with_ids_collate

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    data = WithSampleIds(Tokens({SAMPLES}))
    sampler = DistributedSampler(data, shuffle=True, seed=4)
    loader = DataLoader(data, batch_size=3, sampler=sampler, collate_fn=with_ids_collate)
    summary = write_teacher_cache(TinyLM(seed=0), live_adaptor, loader, sys.argv[1], k={K},
                                  values="float32", shard_samples=4, progress_bar=False)
    assert summary.finished, summary
    dist.destroy_process_group()
''')

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is unavailable")


def test_two_ranks_write_one_cache(tmp_path: Path) -> None:
    script = tmp_path / "write.py"
    script.write_text(SCRIPT)
    out = tmp_path / "cache"
    torchrun(script, str(out))

    cache = TeacherCache(out)
    assert cache.manifest["world_size"] == 2
    assert {shard["rank"] for shard in cache.manifest["shards"]} == {0, 1}
    assert sum(shard["samples"] for shard in cache.manifest["shards"]) == SAMPLES + 1  # one repeat
    assert cache.sample_ids.tolist() == list(range(SAMPLES))
    teacher, data = TinyLM(seed=0), Tokens(SAMPLES)
    for sample_id, item in enumerate(data):
        ids, values = exact_topk(teacher, item["input_ids"], K)
        got = cache[sample_id]
        assert torch.equal(got.tokens, item["input_ids"])
        assert torch.equal(got.topk_ids, ids)
        torch.testing.assert_close(got.topk_logprobs, values, atol=1e-5, rtol=0)
