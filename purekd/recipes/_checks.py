"""What a structured recipe must satisfy beyond its types: ranges, choices, fields that exclude
or need each other, and the files it names. :func:`problems` returns every failure as a
``key.path: what is wrong`` line; nothing here loads a model or imports torch.

The divergences' parameters are checked against :data:`DIVERGENCES` (the built-in token-level
losses, their parameters and ranges, as in ``purekd.presets.TOKEN_KD_LOSSES``). A name not in
it may be a divergence registered with ``purekd.losses.register_divergence``: it is checked
after this pass, by ``DistillationConfig`` itself (:func:`._train.distill_config`), still
before anything loads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

from ._paths import resolve
from ._schema import (
    CACHE_VALUES,
    DEVICES,
    FORMATS,
    OPTIMIZERS,
    SCHEDULES,
    SINKS,
    SOURCES,
    Checkpoint,
    Data,
    Loss,
    Metrics,
    OnPolicy,
    Optimizer,
    Schedule,
    Student,
    Teacher,
    Train,
)

DIVERGENCES: dict[str, tuple[str, ...]] = {
    "forward_kl": ("tail",),
    "reverse_kl": ("tail",),
    "jsd": ("beta", "tail"),
    "scaled_jsd": ("beta",),
    "skew_forward_kl": ("alpha",),
    "skew_reverse_kl": ("alpha",),
    "tvd": (),
}
"""The built-in token-level ``kd_loss_type`` names and the parameters each takes."""

TOPK_LOSSES = ("forward_kl", "reverse_kl", "jsd")
"""The divergences a top-k teacher cache supports."""

CROSS_TOKENIZER = ("gold", "uld")
"""The losses across two tokenizers (``gold`` needs them; ``uld`` also runs on one)."""

SAMPLED: dict[str, tuple[str, ...]] = {"sampled_reverse_kl": ("gamma",)}
"""The on-policy losses on sampled tokens (``purekd.presets.SAMPLED_KD_LOSSES``) and their
parameters (given as ``loss.params``)."""

def _number(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def _covers(failed: str, path: str) -> bool:
    return path == failed or path.startswith((f"{failed}.", f"{failed}["))


class _Problems:
    """The problems found so far; a check that reads a key path that failed to structure
    (``failed``: its value is a stand-in default) adds nothing."""

    def __init__(self, failed: Collection[str] = ()) -> None:
        self.lines: list[str] = []
        self.failed = tuple(failed)

    def add(self, path: str, message: str, *, about: tuple[str, ...] = ()) -> None:
        """``path: message``, unless ``path`` or a key path in ``about`` (the other fields the
        check read) failed to structure."""
        if any(_covers(f, p) for f in self.failed for p in (path, *about)):
            return
        self.lines.append(f"{path}: {message}")

    def within(self, path: str, value: float | None, low: float, high: float, *,
               open_low: bool = False, open_high: bool = False) -> None:
        """``value`` in the interval (None passes): ``loss.beta: 1.5 is outside [0, 1]``."""
        if value is None:
            return
        below = value <= low if open_low else value < low
        above = value >= high if open_high else value > high
        if math.isnan(value) or below or above:
            left, right = "(" if open_low else "[", ")" if open_high else "]"
            high_text = "inf" if math.isinf(high) else _number(high)
            self.add(path, f"{_number(value)} is outside {left}{_number(low)}, {high_text}{right}")

    def at_least(self, path: str, value: int | None, low: int) -> None:
        if value is not None and value < low:
            self.add(path, f"{value} is less than {low}")

    def one_of(self, path: str, value: str, choices: tuple[str, ...]) -> None:
        if value not in choices:
            import difflib

            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.7)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.add(path, f"{value!r} is not one of {', '.join(choices)}{hint}")

    def exists(self, path: str, value: str | None, kind: str = "") -> None:
        if value is None:
            return
        try:
            found = resolve(value)
        except FileNotFoundError as error:
            self.add(path, str(error))
            return
        if kind == "file" and not found.is_file():
            self.add(path, f"{value!r} is a directory, not a file")


def _teacher(p: _Problems, teacher: Teacher, loss: Loss | None) -> None:
    p.exists("teacher.path", teacher.path)
    p.exists("teacher.tokenizer", teacher.tokenizer)
    p.one_of("teacher.source", teacher.source, SOURCES)
    p.at_least("teacher.k", teacher.k, 1)
    p.one_of("teacher.cache_values", teacher.cache_values, CACHE_VALUES)
    if teacher.cache_dir is not None and teacher.source != "cache":
        p.add("teacher.cache_dir", f"set, but teacher.source is {teacher.source!r}: the cache "
              "is read only with source: cache", about=("teacher.source",))


def _student(p: _Problems, student: Student) -> None:
    if (student.path is None) == (student.layers is None):
        p.add("student", "give either path (a model directory or .gguf file) or layers (the "
              "teacher's decoder layers to keep), not both" if student.path is not None
              else "give either path (a model directory or .gguf file) or layers (the "
              "teacher's decoder layers to keep)", about=("student.path", "student.layers"))
    p.exists("student.path", student.path)
    layers = student.layers
    if isinstance(layers, int):
        p.at_least("student.layers", layers, 1)
    elif isinstance(layers, list):
        if not layers:
            p.add("student.layers", "an empty list keeps no layer")
        elif any(i < 0 for i in layers) or layers != sorted(set(layers)):
            p.add("student.layers", f"{layers} must be distinct layer indices >= 0 in "
                  "ascending order")


def _data(p: _Problems, data: Data) -> None:
    p.exists("data.path", data.path)
    p.exists("data.eval_path", data.eval_path)
    p.one_of("data.format", data.format, FORMATS)
    p.at_least("data.seq_len", data.seq_len, 2)
    p.at_least("data.limit", data.limit, 1)
    p.at_least("data.train_rows", data.train_rows, 1)
    p.at_least("data.eval_rows", data.eval_rows, 0)
    if data.eval_path is not None and data.eval_rows:
        p.add("data.eval_rows", "set together with data.eval_path: hold rows out of data.path "
              "or read a separate file, not both", about=("data.eval_path",))
    if data.separator is not None and not data.packing:
        p.add("data.separator", "set, but data.packing is false: the separator joins records "
              "only when packing", about=("data.packing",))


def _loss(p: _Problems, loss: Loss, teacher: Teacher | None) -> None:
    name = loss.kd_loss_type
    p.within("loss.temperature", loss.temperature, 0, math.inf, open_low=True, open_high=True)
    p.within("loss.ce_weight", loss.ce_weight, 0, math.inf, open_high=True)
    p.within("loss.beta", loss.beta, 0, 1)
    p.within("loss.alpha", loss.alpha, 0, 1, open_low=True, open_high=True)
    if name in ("ce", "mse"):
        p.add("loss.kd_loss_type", f"{name!r} is TextBrewer's classification loss; a language "
              "model distils token by token: use 'forward_kl' (or reverse_kl, jsd, "
              f"skew_forward_kl, ...: {', '.join(DIVERGENCES)})")
        return
    known = DIVERGENCES.get(name)
    given = [key for key in ("beta", "alpha", "tail") if getattr(loss, key) is not None]
    if name in SAMPLED:
        for key in given:
            p.add(f"loss.{key}", f"{name} takes no parameter {key!r} (it takes: gamma, as "
                  "loss.params: {gamma: ...})", about=("loss.kd_loss_type",))
        for key in sorted(set(loss.params) - set(SAMPLED[name])):
            p.add(f"loss.params.{key}", f"{name} takes no parameter {key!r} (it takes: "
                  f"{', '.join(SAMPLED[name])})", about=("loss.kd_loss_type",))
        gamma = loss.params.get("gamma")
        if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, (int, float))):
            p.add("loss.params.gamma", f"expected a number, got {gamma!r}")
        elif gamma is not None:
            p.within("loss.params.gamma", gamma, 0, 1)
        if teacher is not None and teacher.source != "on_policy":
            p.add("loss.kd_loss_type", f"{name!r} scores the student's own samples: it needs "
                  f"teacher.source: on_policy (got {teacher.source!r})",
                  about=("teacher.source",))
    if known is not None:
        for key in given:
            if key not in known:
                takes = ", ".join(known) if known else "no parameters"
                p.add(f"loss.{key}", f"{name} takes no parameter {key!r} (it takes: {takes})",
                      about=("loss.kd_loss_type",))
        if loss.params:
            p.add("loss.params", f"{sorted(loss.params)}: params are for a registered "
                  f"divergence; {name} takes {', '.join(known) or 'no parameters'} as "
                  "loss.<name>", about=("loss.kd_loss_type",))
    if teacher is not None and teacher.source == "cache" and known is not None \
            and name not in TOPK_LOSSES:
        p.add("loss.kd_loss_type", f"{name!r} needs the teacher's whole distribution, a top-k "
              f"cache has only k entries: use one of {', '.join(TOPK_LOSSES)}, or "
              "teacher.source: live", about=("teacher.source",))
    if loss.tail:
        if teacher is not None and teacher.source != "cache":
            p.add("loss.tail", "true needs a top-k teacher (teacher.source: cache): the tail "
                  "bucket holds the mass outside the cached k entries",
                  about=("teacher.source",))
        if loss.temperature != 1:
            p.add("loss.tail", f"true needs loss.temperature 1 (got "
                  f"{_number(loss.temperature)}): the tail bucket is at temperature 1",
                  about=("loss.temperature",))
    for index, match in enumerate(loss.matches):
        p.at_least(f"loss.matches[{index}].layer_T", match.layer_T, 0)
        p.at_least(f"loss.matches[{index}].layer_S", match.layer_S, 0)
        p.within(f"loss.matches[{index}].weight", match.weight, 0, math.inf, open_high=True)
    if loss.matches and teacher is not None and teacher.source == "cache":
        p.add("loss.matches", "intermediate matches compare hidden states, which a top-k "
              "teacher cache does not hold: use teacher.source: live",
              about=("teacher.source",))


def _on_policy(p: _Problems, on_policy: OnPolicy) -> None:
    p.within("on_policy.lmbda", on_policy.lmbda, 0, 1)
    p.at_least("on_policy.max_new_tokens", on_policy.max_new_tokens, 1)
    p.within("on_policy.temperature", on_policy.temperature, 0, math.inf, open_low=True,
             open_high=True)
    p.within("on_policy.top_p", on_policy.top_p, 0, 1, open_low=True)
    p.at_least("on_policy.top_k", on_policy.top_k, 0)
    for index, token in enumerate(on_policy.stop_token_ids):
        p.at_least(f"on_policy.stop_token_ids[{index}]", token, 0)
    p.at_least("on_policy.pad_token_id", on_policy.pad_token_id, 0)
    p.at_least("on_policy.seed", on_policy.seed, 0)
    p.at_least("on_policy.prompt_tokens", on_policy.prompt_tokens, 1)


def _on_policy_rules(p: _Problems, sections: dict[str, Any]) -> None:
    """What ``teacher.source: on_policy`` needs of the other sections, and the reverse."""
    teacher, on_policy = sections.get("teacher"), sections.get("on_policy")
    data, loss = sections.get("data"), sections.get("loss")
    if teacher is None or teacher.source not in SOURCES:  # (named by its own check)
        return
    if teacher.source != "on_policy":
        if on_policy is not None and teacher.source == "cache":
            p.add("teacher.source", "'cache' with an on_policy section: a top-k cache holds the "
                  "teacher's outputs on the data's text, not on the student's samples; set "
                  "teacher.source: on_policy (the teacher scores every sample), or remove "
                  "on_policy", about=("on_policy",))
        elif on_policy is not None:
            p.add("on_policy", f"set, but teacher.source is {teacher.source!r}: set "
                  "teacher.source: on_policy to sample, or remove on_policy",
                  about=("teacher.source",))
        return
    settings = on_policy if on_policy is not None else OnPolicy()
    why = ("(teacher.source: on_policy)")
    if data is not None:
        if data.packing:
            p.add("data.packing", f"true joins the records into one stream, but on-policy "
                  f"sampling starts from each record's prompt {why}: set data.packing: false",
                  about=("teacher.source",))
        if data.format == "text" and settings.prompt_tokens is None:
            p.add("data.format", f"text records have no prompt to sample from {why}: set "
                  "on_policy.prompt_tokens (the first N tokens of each record are its prompt), "
                  "or give prompt_completion or messages records",
                  about=("teacher.source", "on_policy.prompt_tokens"))
        if data.format in ("prompt_completion", "messages") \
                and settings.prompt_tokens is not None:
            p.add("on_policy.prompt_tokens", f"set, but data.format is {data.format!r}: its "
                  "records have their own prompts", about=("data.format",))
    if loss is not None:
        if loss.ce_weight and not settings.seq_kd:
            p.add("loss.ce_weight", f"{_number(loss.ce_weight)} {why}: the cross-entropy would "
                  "be on the student's own samples (it reinforces whatever the student drew); "
                  "set 0, or on_policy.seq_kd: true (the teacher samples: sequence-level KD)",
                  about=("teacher.source", "on_policy.seq_kd"))
        if loss.matches:
            p.add("loss.matches", f"intermediate matches are not available on-policy {why}: "
                  "the sampled sequences' hidden states hold prompt and padding rows; remove "
                  "them, or use teacher.source: live", about=("teacher.source",))
        if loss.kd_loss_type in SAMPLED and settings.lmbda != 1:
            p.add("on_policy.lmbda", f"{_number(settings.lmbda)} with loss.kd_loss_type "
                  f"{loss.kd_loss_type!r}: the sampled-token loss needs every batch sampled; "
                  "set 1", about=("loss.kd_loss_type",))
        if loss.kd_loss_type in SAMPLED and loss.ce_weight and settings.seq_kd:
            p.add("loss.ce_weight", f"{_number(loss.ce_weight)} with loss.kd_loss_type "
                  f"{loss.kd_loss_type!r}: the sampled-token loss does not take the "
                  "cross-entropy in its pass; set 0", about=("loss.kd_loss_type",))


def _cross_tokenizer_rules(p: _Problems, sections: dict[str, Any],
                           tokenizer: str | None) -> None:
    """A teacher with a tokenizer of its own (``teacher.tokenizer``) and the two-tokenizer
    losses (``gold``, ``uld``) need each other, and a few things of the rest."""
    teacher, student = sections.get("teacher"), sections.get("student")
    data, loss = sections.get("data"), sections.get("loss")
    if teacher is None or loss is None:
        return
    name = loss.kd_loss_type
    own = teacher.tokenizer
    if own is None:
        if name == "gold":
            p.add("loss.kd_loss_type", "'gold' aligns two tokenizations of the text: give the "
                  "teacher's tokenizer as teacher.tokenizer and the student's as tokenizer (for "
                  "one tokenizer use a divergence such as forward_kl)",
                  about=("teacher.tokenizer",))
        return
    if tokenizer is None:
        p.add("tokenizer", "missing: with teacher.tokenizer (the teacher's) set, give the "
              "student's tokenizer here", about=("teacher.tokenizer",))
    elif own == tokenizer:
        p.add("teacher.tokenizer", f"{own!r} is also the student's tokenizer: a cross-tokenizer "
              "run needs two different ones; for one tokenizer remove teacher.tokenizer",
              about=("tokenizer",))
        return
    if name not in CROSS_TOKENIZER:
        p.add("loss.kd_loss_type", f"{name!r} compares the two models' distributions id by "
              "id, but teacher.tokenizer gives the teacher a tokenizer of its own: use 'gold' "
              "or 'uld' (docs/cross-tokenizer.md), or remove teacher.tokenizer",
              about=("teacher.tokenizer",))
        return
    why = "(teacher.tokenizer: two tokenizers)"
    if teacher.source != "live":
        p.add("teacher.source", f"{teacher.source!r} {why}: the teacher must run on its own "
              "tokenisation of each text; set teacher.source: live",
              about=("teacher.tokenizer",))
    if student is not None and student.path is None:
        p.add("student.layers", f"a student cut from the teacher has the teacher's tokenizer "
              f"{why}: give student.path (a model of the student's tokenizer)",
              about=("teacher.tokenizer", "student.path"))
    if data is not None:
        if data.packing:
            p.add("data.packing", f"true {why}: each record's text is tokenised by both "
                  "tokenizers and aligned; set data.packing: false", about=("teacher.tokenizer",))
        if data.format not in ("text", "auto"):
            p.add("data.format", f"{data.format!r} {why}: only text records are aligned "
                  "across tokenizers; use format: text", about=("teacher.tokenizer",))
    if loss.ce_weight:
        p.add("loss.ce_weight", f"{_number(loss.ce_weight)} {why}: the cross-entropy does not "
              f"join the {name} term; set 0", about=("teacher.tokenizer", "loss.kd_loss_type"))
    if loss.matches:
        p.add("loss.matches", f"not available {why}: the two sides' positions differ",
              about=("teacher.tokenizer",))


def _optimizer(p: _Problems, optimizer: Optimizer) -> None:
    p.one_of("optimizer.name", optimizer.name, OPTIMIZERS)
    p.within("optimizer.lr", optimizer.lr, 0, math.inf, open_low=True, open_high=True)
    p.within("optimizer.weight_decay", optimizer.weight_decay, 0, math.inf, open_high=True)
    p.within("optimizer.eps", optimizer.eps, 0, math.inf, open_low=True, open_high=True)
    p.within("optimizer.momentum", optimizer.momentum, 0, 1, open_high=True)
    if len(optimizer.betas) != 2:
        p.add("optimizer.betas", f"{optimizer.betas}: give two numbers, e.g. [0.9, 0.999]")
    for index, beta in enumerate(optimizer.betas[:2]):
        p.within(f"optimizer.betas[{index}]", beta, 0, 1, open_high=True)


def _schedule(p: _Problems, schedule: Schedule) -> None:
    p.one_of("schedule.name", schedule.name, SCHEDULES)
    p.within("schedule.warmup", schedule.warmup, 0, 1, open_high=True)
    p.within("schedule.min_lr_ratio", schedule.min_lr_ratio, 0, 1)


def _train(p: _Problems, train: Train) -> None:
    if (train.steps is None) == (train.epochs is None):
        p.add("train", "give either steps or epochs" + (", not both" if train.steps else ""),
              about=("train.steps", "train.epochs"))
    p.at_least("train.steps", train.steps, 1)
    p.at_least("train.epochs", train.epochs, 1)
    p.at_least("train.batch_size", train.batch_size, 1)
    p.at_least("train.accumulation", train.accumulation, 1)
    device = train.device
    if device.split(":")[0] not in DEVICES or (":" in device and not device.startswith("cuda:")):
        p.add("train.device", f"{device!r} is not one of auto, cpu, cuda, cuda:N")


def _checkpoint(p: _Problems, checkpoint: Checkpoint) -> None:
    p.at_least("checkpoint.every", checkpoint.every, 1)
    p.at_least("checkpoint.keep_last", checkpoint.keep_last, 1)
    if checkpoint.resume and not checkpoint.save_state:
        p.add("checkpoint.resume", "true needs checkpoint.save_state: true (a run resumes from "
              "its saved states)", about=("checkpoint.save_state",))


_SINK_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard"}


def _metrics(p: _Problems, metrics: Metrics) -> None:
    import importlib.util

    for index, sink in enumerate(metrics.sinks):
        p.one_of(f"metrics.sinks[{index}]", sink, SINKS)
        package = _SINK_PACKAGES.get(sink)
        if package is not None and importlib.util.find_spec(package) is None:
            extra = "logging" if sink == "tensorboard" else "tracking"
            p.add(f"metrics.sinks[{index}]", f"{sink!r} needs the {package} package (pip "
                  f"install 'purekd[{extra}]')")
    if len(set(metrics.sinks)) != len(metrics.sinks):
        p.add("metrics.sinks", f"{metrics.sinks} names a sink twice")
    if "jsonl" not in metrics.sinks:
        p.add("metrics.sinks", "jsonl is always written (OUTPUT_DIR/metrics.jsonl, the run's "
              "record that resume truncates): list it")
    for key, sink in (("log_dir", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow")):
        if getattr(metrics, key) and sink not in metrics.sinks:
            p.add(f"metrics.{key}", f"set, but {sink!r} is not in metrics.sinks",
                  about=("metrics.sinks",))
    if metrics.project is not None and not {"wandb", "mlflow"} & set(metrics.sinks):
        p.add("metrics.project", "set, but neither 'wandb' nor 'mlflow' is in metrics.sinks",
              about=("metrics.sinks",))


def problems(sections: dict[str, Any], tokenizer: str | None = None, *,
             failed: Collection[str] = ()) -> list[str]:
    """Every problem of the structured ``sections`` (section name -> instance; a section that
    did not structure is absent and skipped). ``failed``: key paths that did not structure
    (their values in ``sections`` are stand-ins): a check that reads one is skipped."""
    p = _Problems(failed)
    get = sections.get
    checks: list[tuple[str, Callable[..., None], tuple[Any, ...]]] = [
        ("teacher", _teacher, (get("loss"),)),
        ("student", _student, ()),
        ("data", _data, ()),
        ("loss", _loss, (get("teacher"),)),
        ("optimizer", _optimizer, ()),
        ("schedule", _schedule, ()),
        ("train", _train, ()),
        ("checkpoint", _checkpoint, ()),
        ("metrics", _metrics, ()),
        ("on_policy", _on_policy, ()),
    ]
    for key, check, extra in checks:
        if sections.get(key) is not None:
            check(p, sections[key], *extra)
    _on_policy_rules(p, sections)
    _cross_tokenizer_rules(p, sections, tokenizer)
    p.exists("tokenizer", tokenizer)
    train, checkpoint = sections.get("train"), sections.get("checkpoint")
    if train is not None and checkpoint is not None and train.epochs is not None \
            and checkpoint.every is not None:
        p.add("checkpoint.every", "set with train.epochs: an epochs run checkpoints at the end of "
              "every epoch; give train.steps to checkpoint every N steps",
              about=("train.epochs",))
    return p.lines


__all__ = ["CROSS_TOKENIZER", "DIVERGENCES", "SAMPLED", "TOPK_LOSSES", "problems"]
