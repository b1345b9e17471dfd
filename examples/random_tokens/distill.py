"""TextBrewer 0.2.1's ``examples/random_tokens_example/distill.py``, migrated to purekd.

The migration is the import lines: ``import purekd as textbrewer`` and the same names from
``purekd``; the body below is TextBrewer's example (BERT teacher and student built from configs,
random tokens, ``display_parameters``, ``GeneralDistiller`` with hidden-state ``hidden_mse`` and
``nst`` matches, AdamW and a linear warm-up schedule, an evaluation callback). TextBrewer's
``bert_config.json`` files are not shipped, so the sizes are arguments (defaults: a 12-layer
teacher and a 3-layer student, width 128, which run on a CPU in seconds; TextBrewer's are 768).

    python examples/random_tokens/distill.py [--backend purekd|textbrewer] [--compile auto]

``main()`` returns the student's weights before and after training and the time of the whole run (models, data,
distillation), so ``tests/integrations/test_random_tokens.py`` can compare purekd with
TextBrewer and ``benchmarks/random_tokens.py`` can time them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def main(backend: str = "purekd", compile: Any = None, layers_T: int = 12, layers_S: int = 3,
         hidden: int = 128, samples: int = 100, length: int = 128, batch_size: int = 32,
         num_epochs: int = 10, seed: int = 0, quiet: bool = True) -> dict[str, Any]:
    start = time.perf_counter()
    if backend == "purekd":  # the migration: these lines
        import purekd as textbrewer
        from purekd import DistillationConfig, GeneralDistiller, TrainingConfig
    elif backend == "textbrewer":
        import textbrewer
        from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
    else:
        raise ValueError(f"backend={backend!r}: 'purekd' or 'textbrewer'")
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        get_linear_schedule_with_warmup,
    )

    torch.manual_seed(seed)
    output_dir = tempfile.mkdtemp(prefix=f"random-tokens-{backend}-")
    out = io.StringIO()
    printing = contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext()

    # ---- TextBrewer's example from here (sizes as arguments, the device the CPU) ----
    device = torch.device("cpu")

    def bert_config(layers: int) -> Any:
        return BertConfig(vocab_size=21128, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=max(hidden // 64, 1), intermediate_size=4 * hidden,
                          max_position_embeddings=512, output_hidden_states=True)

    teacher_model = BertForSequenceClassification(bert_config(layers_T))
    student_model = BertForSequenceClassification(bert_config(layers_S))
    teacher_model.to(device=device)
    student_model.to(device=device)
    initial = {k: v.detach().clone() for k, v in student_model.state_dict().items()}

    class DictDataset(Dataset):
        def __init__(self, all_input_ids: Any, all_attention_mask: Any, all_labels: Any):
            assert len(all_input_ids) == len(all_attention_mask) == len(all_labels)
            self.all_input_ids = all_input_ids
            self.all_attention_mask = all_attention_mask
            self.all_labels = all_labels

        def __getitem__(self, index: int) -> dict[str, Any]:
            return {"input_ids": self.all_input_ids[index],
                    "attention_mask": self.all_attention_mask[index],
                    "labels": self.all_labels[index]}

        def __len__(self) -> int:
            return self.all_input_ids.size(0)

    all_input_ids = torch.randint(low=0, high=100, size=(samples, length))
    all_attention_mask = torch.ones_like(all_input_ids)
    all_labels = torch.randint(low=0, high=2, size=(samples,))
    dataset = DictDataset(all_input_ids, all_attention_mask, all_labels)
    eval_dataset = DictDataset(all_input_ids, all_attention_mask, all_labels)
    dataloader = DataLoader(dataset, batch_size=batch_size)
    num_training_steps = len(dataloader) * num_epochs
    optimizer = torch.optim.AdamW(student_model.parameters(), lr=1e-4)
    scheduler_class = get_linear_schedule_with_warmup
    scheduler_args = {"num_warmup_steps": int(0.1 * num_training_steps),
                      "num_training_steps": num_training_steps}

    with printing:
        print("\nteacher_model's parametrers:")
        result, _ = textbrewer.utils.display_parameters(teacher_model, max_level=3)
        print(result)
        print("student_model's parametrers:")
        result, _ = textbrewer.utils.display_parameters(student_model, max_level=3)
        print(result)

    def simple_adaptor(batch: Any, model_outputs: Any) -> dict[str, Any]:
        return {"logits": model_outputs[1], "hidden": model_outputs[2],
                "inputs_mask": batch["attention_mask"]}

    accuracies: list[float] = []

    def predict(model: Any, eval_dataset: Any, step: int, device: Any) -> None:
        model.eval()
        pred_logits, label_ids = [], []
        loader = DataLoader(eval_dataset, batch_size=32)
        for batch in loader:
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            labels = batch["labels"]
            with torch.no_grad():
                logits, *_ = model(input_ids=input_ids, attention_mask=attention_mask,
                                   return_dict=False)
            pred_logits.append(logits.cpu())
            label_ids.append(labels)
        model.train()
        predictions = torch.cat(pred_logits).argmax(-1)
        accuracies.append(float((predictions == torch.cat(label_ids)).float().mean()))

    from functools import partial
    callback_fun = partial(predict, eval_dataset=eval_dataset, device=device)

    train_config = TrainingConfig(device=device, output_dir=output_dir)
    distill_config = DistillationConfig(
        temperature=8,
        hard_label_weight=0,
        kd_loss_type="ce",
        probability_shift=False,
        intermediate_matches=[
            {"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse", "weight": 1},
            {"layer_T": 8, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1},
            {"layer_T": [0, 0], "layer_S": [0, 0], "feature": "hidden", "loss": "nst",
             "weight": 1},
            {"layer_T": [8, 8], "layer_S": [2, 2], "feature": "hidden", "loss": "nst",
             "weight": 1}])

    with printing:
        print("train_config:")
        print(train_config)
        print("distill_config:")
        print(distill_config)

    options = {} if compile is None or backend == "textbrewer" else {"compile": compile}
    distiller = GeneralDistiller(
        train_config=train_config, distill_config=distill_config,
        model_T=teacher_model, model_S=student_model,
        adaptor_T=simple_adaptor, adaptor_S=simple_adaptor, **options)

    with printing, distiller:
        distiller.train(optimizer, scheduler_class=scheduler_class, scheduler_args=scheduler_args,
                        dataloader=dataloader, num_epochs=num_epochs, callback=callback_fun)
    # ---- end of TextBrewer's example ----

    step = getattr(distiller, "step", None)
    loss = getattr(step, "loss", None)
    return {"seconds": time.perf_counter() - start,
            "student": {k: v.detach().clone() for k, v in student_model.state_dict().items()},
            "initial_student": initial,
            "accuracies": accuracies, "printed": out.getvalue(),
            "decision": getattr(loss, "decision", None),
            "compiled": bool(getattr(loss, "is_compiled", False))}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="purekd", choices=["purekd", "textbrewer"])
    parser.add_argument("--compile", default=None, choices=["auto", "true", "false"],
                        help="purekd's compile= (default: purekd's default)")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    choice = {"auto": "auto", "true": True, "false": False, None: None}[args.compile]
    run = main(args.backend, choice, num_epochs=args.epochs, quiet=False)
    print(f"{args.backend}: {run['seconds']:.1f} s, accuracies {run['accuracies']}"
          + (f"; {run['decision']}" if run["decision"] else ""))
