"""Projection parameters join the optimizer with their own options, as in TextBrewer."""

from __future__ import annotations

import torch
from torch import nn

import purekd
from tests.runner._helpers import Tiny, adaptor


def _custom_loss(out_S, out_T, mask_S, mask_T):
    del mask_S, mask_T
    return (out_S - out_T).pow(2).mean()


def test_each_projection_gets_its_own_group_options(tmp_path):
    teacher, student = Tiny(8, 3), Tiny(6, 2)
    custom_proj = nn.Linear(6, 8)
    distiller = purekd.GeneralDistiller(
        purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path)),
        {"intermediate_matches": [{"layer_T": 3, "layer_S": 2, "feature": "hidden",
                                   "loss": "hidden_mse", "weight": 1,
                                   "proj": ["linear", 6, 8, {"lr": 0.25}]}]},
        teacher, student, adaptor, adaptor,
        custom_matches=[
            # a projection that is a plain function: nothing to optimise, no group
            {"module_T": teacher.blocks[0], "module_S": student.blocks[0], "weight": 1,
             "loss": _custom_loss, "proj_func": lambda out: torch.cat([out, out[..., :2]], -1),
             "proj_group": {"lr": 0.75}},
            # a projection module: its own group with its own options
            {"module_T": teacher.blocks[1], "module_S": student.blocks[1], "weight": 1,
             "loss": _custom_loss, "proj_func": custom_proj, "proj_group": {"lr": 0.5}},
        ],
        compile=False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    distiller._prepare_optimizer(optimizer)
    groups = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert all(groups[id(p)] == 0.1 for p in student.parameters())
    assert all(groups[id(p)] == 0.25 for p in distiller.projs[0].parameters())
    assert all(groups[id(p)] == 0.5 for p in custom_proj.parameters())
    assert len(optimizer.param_groups) == 3
