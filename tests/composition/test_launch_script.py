"""The launch script of ``docs/distributed.md`` runs as written under ``torchrun`` (two CPU
processes, gloo): the code block is taken from the page, so page and test cannot drift.

The page leaves the models, adaptors, distillation config and dataset to the reader ("as for one
process"); the test defines them (tiny GPT-2s) in front of the block, and checks afterwards that
the run trained, wrote its checkpoints and sharded states, and that the process group existed
as soon as the distiller was built (the ``DistributedSampler`` of the block needs it).
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

from .._torchrun import REPO, torchrun

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is unavailable")

PRELUDE = textwrap.dedent('''
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from purekd.integrations.huggingface import hf_adaptor

    def gpt2(width, seed):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=width, n_layer=2,
                                          n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))

    torch.set_num_threads(1)
    teacher, student = gpt2(32, 0), gpt2(16, 1)
    adaptor_T = adaptor_S = hf_adaptor(causal=True)
    distill_config = {"kd_loss_type": "forward_kl", "temperature": 2.0}
    ids = torch.randint(64, (32, 8), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row}
               for row in ids]
    initial = {k: v.clone() for k, v in student.state_dict().items()}
''')

EPILOGUE = textwrap.dedent('''
    import json, torch.distributed
    rank = torch.distributed.get_rank()
    final = purekd.runner.full_state_dict(student)  # a collective: every rank gathers
    moved = max((v - initial[k]).abs().max().item() for k, v in final.items()) if rank == 0 else None
    with open(f"report{rank}.json", "w") as file:
        json.dump({"world": torch.distributed.get_world_size(), "device": device,
                   "moved": moved, "files": sorted(os.listdir("runs/kd"))}, file)
''')


def launch_script() -> str:
    """The first ``python`` block of the page's "Launching on N GPUs" section."""
    page = (REPO / "docs" / "distributed.md").read_text(encoding="utf-8")
    section = page[page.index("## Launching on N GPUs"):]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "no python block under '## Launching on N GPUs'"
    return match.group(1)


def test_the_documented_launch_script_runs_under_torchrun_as_written(tmp_path: Path) -> None:
    block = launch_script()
    assert "DistributedSampler(dataset" in block and "init_process_group" not in block
    script = tmp_path / "train.py"
    # the block's own imports come first: the prelude goes right after them
    head, _, body = block.partition("import purekd\n")
    script.write_text(head + "import purekd\n" + PRELUDE + body + EPILOGUE, encoding="utf-8")
    torchrun(script, cwd=tmp_path, timeout=400)
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in (0, 1)]
    per_epoch = 32 // (2 * 8)  # 32 samples, 8 per process on 2 processes: 2 steps an epoch
    ends = [per_epoch * epoch for epoch in (1, 2, 3)]  # ckpt_frequency=1: at each epoch's end
    expected = sorted([*(f"gs{s}.pkl" for s in ends), *(f"gs{s}.state" for s in ends),
                       "metrics.jsonl", "run.json"])
    for report in reports:
        assert report["world"] == 2 and report["device"] == "cpu"
        assert report["files"] == expected
    assert reports[0]["moved"] > 0  # the student was trained
