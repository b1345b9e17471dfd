"""End-to-end distillation of a BERT where the models dominate the step.

Teacher: BERT 6 layers x 256 (4 heads); student: BERT 2 layers x 128 (2 heads); batch 16 x 128
tokens; logits KD + a hidden-state match through a projection + an attention match. Each
contender runs ``--steps`` SGD steps on the same pre-made batches:

* ``runner``: purekd's ``GeneralDistiller.train(num_steps=...)`` with the defaults
  (``compile="auto"``: here the models dominate, so the loss path stays eager);
* ``runner_compiled``: the same with ``compile=True`` (the loss path always compiled);
* ``hand``: a hand-written eager PyTorch loop of the same math (no checks, logging, checkpoints);
* ``textbrewer``: TextBrewer 0.2.1's ``GeneralDistiller.train(num_steps=...)``.

Medians of ``--repeats`` interleaved rounds; the ratios are medians of per-round ratios (with
their quartiles), so a slow spell of a shared machine slows both sides of a ratio. Targets: runner <= 1.02x hand, runner <= 1.00x TB.

    python -m benchmarks.bert_end_to_end [--steps 8] [--repeats 9] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._common import device, interleaved_rounds, paired_ratio, write

TARGETS = {"runner_vs_hand": 1.02, "runner_vs_textbrewer": 1.00}
TEMPERATURE = 4.0


def bert(layers: int, hidden: int, heads: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=8192, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=256, num_labels=2,
                        attn_implementation="eager")
    return BertForSequenceClassification(config).to(device())


class Wrapped(nn.Module):
    """BERT called as ``model(input_ids, attention_mask, labels)`` returning all outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          output_hidden_states=True, output_attentions=True)


def adaptor(batch: Any, outputs: Any) -> dict[str, Any]:
    return {"logits": outputs.logits, "hidden": outputs.hidden_states,
            "attention": outputs.attentions, "inputs_mask": batch[1], "losses": [outputs.loss]}


MATCHES = [
    {"layer_T": 6, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
     "proj": ["linear", 128, 256]},
    {"layer_T": 5, "layer_S": 1, "feature": "attention", "loss": "attention_mse_sum", "weight": 1},
]


def batches(count: int, batch: int = 16, length: int = 128) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 8192, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
        mask[torch.arange(length)[None, :] >= lengths[:, None]] = 0
        labels = torch.randint(0, 2, (batch,), generator=generator)
        out.append(tuple(t.to(device()) for t in (ids, mask, labels)))
    return out


def hand_loop(teacher: nn.Module, student: nn.Module, proj: nn.Module, data: list[Any],
              lr: float) -> None:
    """The same math, written out: KD CE at T=4 + hidden MSE (masked) + summed-head attention
    MSE (masked) + the hard-label loss."""
    optimizer = torch.optim.SGD([*student.parameters(), *proj.parameters()], lr=lr)
    for ids, mask, labels in data:
        with torch.no_grad():
            out_T = teacher(ids, mask, labels)
        out_S = student(ids, mask, labels)
        p_T = F.softmax(out_T.logits / TEMPERATURE, dim=-1)
        kd = -(p_T * F.log_softmax(out_S.logits / TEMPERATURE, dim=-1)).sum(-1).mean()
        m = mask.to(out_S.logits.dtype)
        diff = (proj(out_S.hidden_states[2]) - out_T.hidden_states[6]).pow(2)
        hidden = (diff * m.unsqueeze(-1)).sum() / (m.sum() * diff.size(-1))
        att_S, att_T = out_S.attentions[1].sum(1), out_T.attentions[5].sum(1)
        pair = m.unsqueeze(-1) * m.unsqueeze(1)
        attention = ((att_S - att_T).pow(2) * pair).sum() / m.sum(1).pow(2).sum()
        loss = kd + hidden + attention + out_S.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def run(steps: int = 8, repeats: int = 9) -> dict[str, Any]:
    import textbrewer

    import purekd

    # every repeat reuses one output_dir, as TextBrewer's runs do; purekd says so each time
    warnings.filterwarnings("ignore", message="output_dir=.* already holds an earlier run")
    torch.manual_seed(0)
    teacher = Wrapped(bert(6, 256, 4)).eval()
    student0 = Wrapped(bert(2, 128, 2))
    data = batches(steps)
    lr = 1e-3
    out_dir = tempfile.mkdtemp()

    purekd_step_cache: dict[str, Any] = {}

    def runner_with(compile: Any) -> Any:
        options = {} if compile is None else {"compile": compile}

        def runner() -> None:
            # one distiller for all repeats: its loss path stays warm, as in a long run
            if compile not in purekd_step_cache:
                student = copy.deepcopy(student0)
                purekd_step_cache[compile] = (student, purekd.GeneralDistiller(
                    purekd.TrainingConfig(device=str(device()), output_dir=out_dir,
                                          ckpt_steps=steps),
                    purekd.DistillationConfig(temperature=TEMPERATURE, hard_label_weight=1,
                                              intermediate_matches=MATCHES),
                    teacher, student, adaptor, adaptor, **options))
            student, distiller = purekd_step_cache[compile]
            with distiller:
                distiller.train(torch.optim.SGD(student.parameters(), lr=lr), data,
                                num_steps=steps)

        return runner

    def hand() -> None:
        student = copy.deepcopy(student0).train()
        proj = nn.Linear(128, 256).to(device())
        hand_loop(teacher, student, proj, data, lr)

    def textbrewer_run() -> None:
        student = copy.deepcopy(student0)
        distiller = textbrewer.GeneralDistiller(
            textbrewer.TrainingConfig(device=str(device()), output_dir=out_dir, ckpt_steps=steps),
            textbrewer.DistillationConfig(temperature=TEMPERATURE, hard_label_weight=1,
                                          intermediate_matches=copy.deepcopy(MATCHES)),
            teacher, student, adaptor, adaptor)
        with distiller:
            distiller.train(torch.optim.SGD(student.parameters(), lr=lr), data, num_steps=steps)

    rounds = interleaved_rounds({"runner": runner_with(None), "hand": hand,
                                 "textbrewer": textbrewer_run,
                                 "runner_compiled": runner_with(True)},
                                repeats=repeats, warmup=1)
    runner_vs_hand = paired_ratio(rounds, "runner", "hand")
    runner_vs_textbrewer = paired_ratio(rounds, "runner", "textbrewer")
    default_loss = purekd_step_cache[None][1].step.loss
    return {
        "steps": steps, "repeats": repeats,
        **{f"{k}_s": statistics.median(v) for k, v in rounds.items()},
        "runner_vs_hand": runner_vs_hand["median"],
        "runner_vs_textbrewer": runner_vs_textbrewer["median"],
        "runner_compiled_vs_textbrewer":
            paired_ratio(rounds, "runner_compiled", "textbrewer")["median"],
        "runner_vs_hand_quartiles": [runner_vs_hand["q1"], runner_vs_hand["q3"]],
        "runner_vs_textbrewer_quartiles": [runner_vs_textbrewer["q1"],
                                           runner_vs_textbrewer["q3"]],
        "default_compile_decision": default_loss.decision,
        "targets": TARGETS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out")
    args = parser.parse_args()
    result = run(args.steps, args.repeats)
    print(json.dumps(result, indent=2))
    write("bert_end_to_end", result, args.out)


if __name__ == "__main__":
    main()
