"""Writing a top-k teacher cache: the teacher (model + adaptor, the forward conventions) runs
once over a dataloader; for every kept token the ``k`` most likely next tokens and their
log-probabilities at temperature 1 are stored under the sample's id.

Samples are grouped ``shard_samples`` at a time, in the order the loader yields them, into
shards (one ``.rows.npy`` and one ``.index.npy`` each, written atomically); after each shard the
rank's progress file (written atomically too) lists it with its checksums. A writer that was
killed resumes from its progress file: it keeps the finished shards whose checksums hold, skips
the teacher's forward for samples already stored and writes the rest into the same shards a
single run would have written — with the same loader order, the finished cache is byte for byte
the one an uninterrupted run writes. Under ``torchrun`` each rank writes its own shards and rank
0 merges the ranks' progress files into the manifest and index once every rank is done.
"""

from __future__ import annotations

import os
import time
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from purekd._devices import move_to_device
from purekd.stages import adapt, forward

from . import _format as fmt
from . import _validate as check
from ._fingerprint import fingerprint_model, fingerprint_tokenizer

Adaptor = Callable[[Any, Any], Any]
SAMPLE_ID, TEACHER = "sample_id", "teacher"
OFFSETS, TEXTS = "offsets", "texts"
"""A cross-tokenizer writer's batches also carry the teacher tokens' character offsets
``(B, L, 2)`` and the ``B`` texts beside ``'sample_id'`` and ``'teacher'``
(:class:`~purekd.teacher_cache.TeacherTextCollate` builds them)."""


class CacheSummary(NamedTuple):
    """What a writer did: samples and tokens it stored in this run, those already stored."""

    path: Path
    samples: int
    tokens: int
    skipped_samples: int
    seconds: float
    bytes_per_token: float
    finished: bool


def default_tokens(batch: Any) -> Tensor | None:
    """The input token ids of a batch or sample, if it has them in a known place: the tensor
    itself, a dict's ``'input_ids'``, or a tuple's first entry (integer tensors only)."""
    found: Any = None
    if isinstance(batch, Tensor):
        found = batch
    elif isinstance(batch, Mapping):
        found = batch.get("input_ids")
    elif isinstance(batch, (list, tuple)) and batch:
        found = batch[0]
    if isinstance(found, Tensor) and not found.is_floating_point() and not found.is_complex():
        return found
    return None


def _as_ids(value: Any, batch_size: int | None = None) -> list[int]:
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.dim() > 1:
            raise TypeError(f"sample ids: expected integers of shape (B,), got a {value.dtype} "
                            f"tensor of shape {tuple(value.shape)}")
        ids = [int(v) for v in value.reshape(-1).tolist()]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        ids = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"sample ids must be integers, got {v!r} ({type(v).__name__}); "
                                "map string ids to integers first")
            ids.append(int(v))
    else:
        raise TypeError(f"sample ids: expected a tensor or a list of ints, got {type(value).__name__}")
    if batch_size is not None and len(ids) != batch_size:
        raise ValueError(f"the batch has {batch_size} rows but {len(ids)} sample ids")
    for v in ids:
        if not -2**63 <= v < 2**63:
            raise ValueError(f"sample id {v} does not fit in 64 bits (the cache stores int64 ids)")
    return ids


def _cross_parts(batch: Any, size: int, length: int) -> tuple[Tensor, list[str]]:
    """A cross-tokenizer writer batch's offsets ``(B, L, 2)`` and texts, checked."""
    if not (isinstance(batch, Mapping) and OFFSETS in batch and TEXTS in batch):
        raise ValueError(
            "a cross-tokenizer cache (student_tokenizer= differs from tokenizer=) stores the "
            "teacher tokens' character offsets and the texts: give batches {'sample_id': ids, "
            "'teacher': batch, 'offsets': (B, L, 2), 'texts': [str, ...]} (collate texts with "
            "purekd.teacher_cache.TeacherTextCollate(tokenizer_T))")
    offsets, texts = batch[OFFSETS], batch[TEXTS]
    if not isinstance(offsets, Tensor) or tuple(offsets.shape) != (size, length, 2):
        shape = tuple(offsets.shape) if isinstance(offsets, Tensor) else type(offsets).__name__
        raise ValueError(f"the batch's 'offsets' is {shape}, expected a tensor ({size}, "
                         f"{length}, 2) (the teacher's logits are ({size}, {length}, V))")
    if not (isinstance(texts, (list, tuple)) and len(texts) == size
            and all(isinstance(t, str) for t in texts)):
        raise ValueError(f"the batch's 'texts' must be a list of {size} strings")
    return offsets, list(texts)


def _split_batch(batch: Any, sample_ids: Callable[[Any], Any] | None) -> tuple[list[int], Any]:
    if sample_ids is not None:
        return _as_ids(sample_ids(batch)), batch
    if not (isinstance(batch, Mapping) and SAMPLE_ID in batch and TEACHER in batch):
        raise ValueError(
            "the writer needs each sample's id: give batches {'sample_id': ids (B,), 'teacher': "
            "the teacher's batch} (wrap the dataset in purekd.teacher_cache.WithSampleIds), or "
            "pass sample_ids=a function batch -> ids")
    return _as_ids(batch[SAMPLE_ID]), batch[TEACHER]


VOCABULARY_BLOCK = 16384
"""Output-layer rows per block when the teacher gives its hidden states and output layer."""


@torch.no_grad()
def topk_of_linear(hidden: Tensor, weight: Tensor, bias: Tensor | None, k: int,
                   next_tokens: Tensor | None = None, *, block: int = VOCABULARY_BLOCK
                   ) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""The top-``k`` of :math:`\log\operatorname{softmax}(z)`, :math:`z = h W^\top + b`, a
    block of the vocabulary at a time: the ``(N, V)`` logits are never formed (a block holds
    ``(N, block)``), and ``weight`` is read once for all ``N`` rows.

    ``hidden`` ``(N, H)``, ``weight`` ``(V, H)``, ``bias`` ``(V,)`` or None. Returns
    ``(values, ids, following)``: ``values`` ``(N, k)`` float32 log-probabilities, descending,
    ``ids`` ``(N, k)`` int64, and, when ``next_tokens`` ``(N,)`` is given, ``following``
    ``(N,)`` float32, :math:`\log p_t(\text{next\_tokens}_t)`. The running maxima and the
    log-sum-exp over the blocks are float32 at least: equal to ``log_softmax(z).topk(k)`` up to
    rounding.
    """
    count, vocab = hidden.size(0), weight.size(0)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    best = torch.full((count, k), float("-inf"), dtype=dtype, device=hidden.device)
    best_ids = torch.zeros(count, k, dtype=torch.int64, device=hidden.device)
    lse = torch.full((count,), float("-inf"), dtype=dtype, device=hidden.device)
    raw_next = (torch.zeros(count, dtype=dtype, device=hidden.device)
                if next_tokens is not None else None)
    for start in range(0, vocab, block):
        stop = min(start + block, vocab)
        z = torch.nn.functional.linear(hidden, weight[start:stop],
                                       None if bias is None else bias[start:stop]).to(dtype)
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
        top, top_ids = z.topk(min(k, stop - start), dim=-1)
        merged = torch.cat([best, top], dim=-1)
        merged_ids = torch.cat([best_ids, top_ids + start], dim=-1)
        best, where = merged.topk(k, dim=-1)
        best_ids = merged_ids.gather(-1, where)
        if next_tokens is not None and raw_next is not None:
            inside = (next_tokens >= start) & (next_tokens < stop)
            local = (next_tokens - start).clamp(0, stop - start - 1)
            raw_next = torch.where(inside, z.gather(-1, local[:, None])[:, 0], raw_next)
    following = None if raw_next is None else (raw_next - lse).float()
    return (best - lse[:, None]).float(), best_ids, following


def _row_lengths(mask: Tensor) -> Tensor:
    """Kept rows per sample of a right-padded 0/1 mask ``(B, L)``; other masks are an error."""
    keep = mask != 0
    lengths = keep.sum(-1)
    prefix = torch.arange(mask.shape[-1], device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(keep, prefix):
        bad = int((keep != prefix).any(-1).nonzero()[0, 0])
        raise ValueError(
            f"row {bad} of the teacher's mask is not a prefix of ones ({keep[bad].int().tolist()}):"
            " the cache stores positions 0..length-1 of each sample, so pad on the right "
            "(tokenizer.padding_side = 'right') and mask only the padding")
    return lengths


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        actual = dist.get_rank(), dist.get_world_size()
        if (rank is not None and rank != actual[0]) or (world_size is not None and world_size != actual[1]):
            raise ValueError(f"rank={rank}, world_size={world_size} disagree with the process "
                             f"group (rank {actual[0]} of {actual[1]}): leave them unset")
        return actual
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
    return rank, world_size


def _progress_bar(enabled: bool | None, total: int | None, rank: int) -> Any:
    if enabled is None:
        import sys

        enabled = sys.stderr.isatty() and rank == 0
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="caching teacher", unit="batch", dynamic_ncols=True)


def check_settings(out: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Raise unless a partial cache's settings ``old`` agree with ``new`` on every key ``new``
    has."""
    diff = sorted(key for key in new if old.get(key) != new[key])
    if diff:
        changes = ", ".join(f"{key}: {old.get(key)!r} there, {new[key]!r} now" for key in diff)
        raise fmt.CacheError(f"{out} holds a cache written with other settings ({changes}): "
                             "resume with the same settings, or write to a new folder")


def read_progress(path: Path) -> dict[str, Any]:
    """A rank's progress file, checked: format, version, settings and shard list (plain shard
    names inside the folder, checksums, counts)."""
    saved = check.load_json_object(path)
    if saved.get("format") != fmt.FORMAT or saved.get("version") not in fmt.VERSIONS:
        raise fmt.CacheError(f"{path}: not a {fmt.FORMAT} progress file of version "
                             f"{' or '.join(map(str, fmt.VERSIONS))} (format "
                             f"{saved.get('format')!r}, version {saved.get('version')!r})"
                             ": write to a new folder")
    if not isinstance(saved.get("config"), dict):
        raise fmt.CacheError(f"{path}: no 'config' object")
    cross = saved["config"].get("cross_tokenizer", False)
    if cross not in (True, False) or saved["version"] != fmt.version_of(bool(cross)):
        raise fmt.CacheError(f"{path}: version {saved['version']} with config.cross_tokenizer="
                             f"{cross!r} (a cross-tokenizer cache is version "
                             f"{fmt.CROSS_VERSION}, any other version {fmt.VERSION})")
    if not isinstance(saved.get("finished"), bool):
        raise fmt.CacheError(f"{path}: finished={saved.get('finished')!r} is not true or false")
    check.check_shards(path, saved.get("shards"))
    return saved


class _RankWriter:
    """One rank's shards and its progress file."""

    def __init__(self, out: Path, rank: int, config: dict[str, Any]):
        self.out, self.rank, self.config = out, rank, config
        self.progress_path = out / fmt.progress_name(rank)
        self.shards: list[dict[str, Any]] = []
        self.stored: set[int] = set()  # ids in the shards of earlier runs (a resume skips them)
        self.buffer: list[tuple[int, np.ndarray]] = []
        if self.progress_path.exists():
            self._resume()
        self._clean()
        for stale in (fmt.MANIFEST, fmt.INDEX):  # merged again when every rank has finished
            (out / stale).unlink(missing_ok=True)

    def _resume(self) -> None:
        saved = read_progress(self.progress_path)
        check_settings(self.out, saved["config"], self.config)
        for shard in saved["shards"]:
            files = {suffix: self.out / f"{shard['name']}.{suffix}.npy" for suffix in ("rows", "index")}
            if any(not path.is_file() or fmt.sha256(path) != shard["sha256"][suffix]
                   for suffix, path in files.items()):
                break  # this shard and every later one are written again
            index = check.read_int64_table(files["index"], f"shard {shard['name']}", 2,
                                           "[sample id, length]")
            self.shards.append(shard)
            self.stored.update(int(v) for v in index[:, 0])

    def _clean(self) -> None:
        """Remove this rank's temporary files and shards that its progress does not list."""
        listed = {shard["name"] for shard in self.shards}
        prefix = f"rank{self.rank:05d}"
        for path in self.out.iterdir():
            name = path.name
            temporary = name.startswith(f".{prefix}") and name.endswith(".tmp")
            unlisted = name.startswith(f"{prefix}-shard") and name.split(".")[0] not in listed
            if temporary or unlisted:
                path.unlink(missing_ok=True)

    def wants(self, sample_id: int) -> bool:
        """Whether ``sample_id`` is still to be stored (not in a shard of an earlier run; a
        repeat within this run is refused before this is asked)."""
        return sample_id not in self.stored

    def add(self, sample_id: int, records: np.ndarray) -> None:
        self.buffer.append((sample_id, records))
        if len(self.buffer) == self.config["shard_samples"]:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = fmt.shard_name(self.rank, len(self.shards))
        dtype = self.buffer[0][1].dtype
        rows = (np.concatenate([r for _, r in self.buffer]) if len(self.buffer) > 1
                else self.buffer[0][1])
        rows = rows.astype(dtype, copy=False)
        index = np.array([(sid, len(r)) for sid, r in self.buffer], dtype=np.int64).reshape(-1, 2)
        sums = {"rows": fmt.save_array(self.out / f"{name}.rows.npy", rows),
                "index": fmt.save_array(self.out / f"{name}.index.npy", index)}
        self.shards.append({"name": name, "rank": self.rank, "samples": len(self.buffer),
                            "tokens": int(index[:, 1].sum()), "sha256": sums})
        self.buffer = []
        self.save_progress(finished=False)

    def save_progress(self, finished: bool) -> None:
        version = fmt.version_of(bool(self.config.get("cross_tokenizer", False)))
        fmt.save_json(self.progress_path, {"format": fmt.FORMAT, "version": version,
                                           "config": self.config, "rank": self.rank,
                                           "finished": finished, "shards": self.shards})


class _LoaderOrder:
    """The sample ids of one rank's loader in this run, in order: a repeat is an error naming
    both positions (batch and row). Memory: a set and 8 bytes per sample."""

    def __init__(self, rank: int):
        self.rank = rank
        self.seen: set[int] = set()
        self.ids = array("q")
        self.batch_starts = array("q")

    def add_batch(self, ids: Sequence[int]) -> None:
        self.batch_starts.append(len(self.ids))
        for row, sample_id in enumerate(ids):
            if sample_id in self.seen:
                first = self.ids.index(sample_id)
                batch = bisect_right(self.batch_starts, first) - 1
                raise fmt.CacheError(
                    f"sample id {sample_id} appears twice in rank {self.rank}'s loader: at batch "
                    f"{batch}, row {first - self.batch_starts[batch]} and at batch "
                    f"{len(self.batch_starts) - 1}, row {row}; each sample is cached once per "
                    "rank under its own id (distinct samples need distinct ids: see "
                    "WithSampleIds; a sampler must not repeat a sample within a rank — "
                    "DistributedSampler's repeats across ranks are fine)")
            self.seen.add(sample_id)
            self.ids.append(sample_id)


def _lock(folder: Path, rank: int) -> Any:
    """Hold ``rank{rank}.lock`` in ``folder`` (an advisory ``flock``, released when the process
    ends, even by SIGKILL); a second writer of the same rank is refused. ``None`` where
    ``fcntl`` does not exist (Windows): there nothing stops two writers."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    path = folder / f"rank{rank:05d}.lock"
    handle = open(path, "a+b")  # noqa: SIM115 - held until the writer returns
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.close()
        raise fmt.CacheError(
            f"another writer is writing rank {rank} of {folder} ({path.name} is held): two "
            "writers of one rank would overwrite each other's shards; wait for it to finish, or "
            "give this one another folder (or rank= / world_size=)") from error
    return handle


def finalize_teacher_cache(out: str | os.PathLike[str]) -> Path | None:
    """Merge every rank's progress file into ``manifest.json`` and ``index.npy``.

    Returns the manifest's path, or ``None`` while some rank has not finished. A sample id that
    several ranks stored (``DistributedSampler`` repeats samples to even out the ranks) is read
    from the lowest rank's copy; the copies must be the same sample — the same length and, when
    the cache stores the input tokens, the same tokens — else a :class:`CacheError` names the
    id and both shards.
    """
    folder = Path(out)
    first = folder / fmt.progress_name(0)
    if not first.exists():
        return None
    config = read_progress(first)["config"]
    world_size = config.get("world_size")
    if not (isinstance(world_size, int) and world_size >= 1):
        raise fmt.CacheError(f"{first}: config.world_size={world_size!r} is not a positive "
                             "integer")
    progress = []
    for rank in range(world_size):
        path = folder / fmt.progress_name(rank)
        if not path.exists():
            return None
        saved = read_progress(path)
        if saved["config"] != config:
            raise fmt.CacheError(f"{path.name} was written with other settings than rank 0's: "
                                 "every rank must run the writer with the same arguments")
        if not saved["finished"]:
            return None
        progress.append(saved)
    shards = [shard for saved in progress for shard in saved["shards"]]
    pieces = [check.read_int64_table(folder / f"{shard['name']}.index.npy",
                                     f"shard {shard['name']}", 2, "[sample id, length]")
              for shard in shards]
    merged, repeats = check.merge_shard_indexes(pieces)
    if len(repeats):
        _check_repeats(folder, shards, pieces, repeats, bool(config["with_tokens"]))
    index_sum = fmt.save_array(folder / fmt.INDEX, merged)
    tokens = int(merged[:, 3].sum())
    cross = bool(config.get("cross_tokenizer", False))
    manifest = {
        "format": fmt.FORMAT, "version": fmt.version_of(cross), **config,
        "record_bytes": fmt.record_dtype(config["k"], config["vocab_size"], config["values"],
                                         config["with_tokens"], cross).itemsize,
        "samples": len(merged), "tokens": tokens,
        "lengths": "index.npy column 3 (per sample id)",
        "index_sha256": index_sum,
        "shards": shards,
    }
    fmt.save_json(folder / fmt.MANIFEST, manifest)
    return folder / fmt.MANIFEST


def _check_repeats(folder: Path, shards: Sequence[dict[str, Any]], pieces: Sequence[np.ndarray],
                   repeats: np.ndarray, with_tokens: bool) -> None:
    """Every repeated id's copies (``repeats``: ``[kept, dropped]`` rows of the concatenated
    shard indexes) hold the same sample: equal lengths and, if stored, equal input tokens."""
    sizes = np.array([len(piece) for piece in pieces], dtype=np.int64)
    ends = np.cumsum(sizes)

    def where(row: int) -> tuple[int, int]:  # (shard number, row in its own index)
        number = int(np.searchsorted(ends, row, side="right"))
        return number, row - int(ends[number] - sizes[number])

    def tokens(number: int, local: int) -> np.ndarray:
        index = pieces[number]
        start = int(index[:local, 1].sum())
        rows = np.load(folder / f"{shards[number]['name']}.rows.npy", mmap_mode="r")
        return np.asarray(rows["token"][start:start + int(index[local, 1])])

    for kept, dropped in repeats.tolist():
        (a, i), (b, j) = where(kept), where(dropped)
        sample_id = int(pieces[a][i, 0])
        la, lb = int(pieces[a][i, 1]), int(pieces[b][j, 1])
        problem = (f"other lengths ({la} and {lb} rows)" if la != lb else
                   "other input tokens" if with_tokens and not np.array_equal(tokens(a, i),
                                                                               tokens(b, j))
                   else None)
        if problem is not None:
            raise fmt.CacheError(
                f"sample id {sample_id} is stored by {shards[a]['name']} (row {i}) and by "
                f"{shards[b]['name']} (row {j}) with {problem}: two different samples share one "
                "id (give each sample its own id, e.g. WithSampleIds(dataset, ids)); only "
                "copies of the same sample (DistributedSampler's padding) may repeat")


def write_teacher_cache(
    model: Callable[..., Any],
    adaptor: Adaptor,
    dataloader: Iterable[Any],
    out: str | os.PathLike[str],
    *,
    k: int,
    values: str = "float16",
    vocab_size: int | None = None,
    sample_ids: Callable[[Any], Any] | None = None,
    tokens: Callable[[Any], Tensor | None] | None = default_tokens,
    tokenizer: Any = None,
    student_tokenizer: Any = None,
    teacher_fingerprint: str | None = None,
    shard_samples: int = 1024,
    device: str | torch.device | None = None,
    model_args: Mapping[str, Any] | None = None,
    progress_bar: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> CacheSummary:
    """Run the teacher over ``dataloader`` once and store its top-``k`` for every kept token.

    * Batches are ``{'sample_id': ids (B,), 'teacher': batch}`` (:class:`WithSampleIds` makes
      them), or any batch with ``sample_ids(batch) -> ids``. The teacher runs as
      ``adaptor(batch, forward(model, batch, **model_args))``; its ``logits[0]`` ``(B, L, V)``
      are the scores — or, without ``logits``, its ``lm_hidden`` ``(B, L, H)`` and
      ``lm_weight`` ``(V, H)`` (``lm_bias``): the output layer is then applied a block of the
      vocabulary at a time (:func:`topk_of_linear`), never forming the ``(B, L, V)`` logits, for
      a large vocabulary; the kept rows are those of its ``logits_mask`` (else its ``inputs_mask``,
      else all), which must be right-padded: row ``t < length`` of a sample is stored.
    * Stored per token: ``ids`` ``(k,)`` and ``log_softmax(logits[t])`` at those ids (float32
      log-softmax, descending), encoded as ``values`` (:data:`VALUE_DTYPES`), and the input token
      ``tokens(batch)[b, t]`` when ``tokens`` finds one.
    * ``tokenizer`` (a tokenizer, vocabulary or fingerprint string) and the teacher's weights
      (``teacher_fingerprint``, else :func:`fingerprint_model` of ``model`` when it is a module)
      are fingerprinted into the manifest, and checked by the reader.
    * ``student_tokenizer`` (the student's tokenizer or its fingerprint), when it differs from
      ``tokenizer`` (the teacher's, then required): a **cross-tokenizer cache** (format version
      2). Batches then also carry ``'offsets'`` ``(B, L, 2)`` and ``'texts'`` (collate texts
      with :class:`TeacherTextCollate`), and each token's record also holds its character
      offsets, the log-probability of the token following it (``log p_t(x_{t+1})``; 0 on a
      sample's last row) and the text's digest; both fingerprints are recorded and checked by
      the reader. See docs/cross-tokenizer.md.
    * Resumes a partial cache in ``out`` written with the same settings; under torchrun (or with
      ``rank`` / ``world_size`` given) each rank writes its own shards.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k={k!r}: expected a positive integer (e.g. 16, 64)")
    if k > check.MAX_K:
        raise ValueError(f"k={k}: at most {check.MAX_K}")
    if values not in fmt.VALUE_DTYPES:
        raise ValueError(f"values={values!r}: expected one of {fmt.VALUE_DTYPES}")
    if not isinstance(shard_samples, int) or shard_samples < 1:
        raise ValueError(f"shard_samples={shard_samples!r}: expected a positive integer")
    rank, world_size = _rank_and_world(rank, world_size)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if teacher_fingerprint is None:
        teacher_fingerprint = (fingerprint_model(model) if isinstance(model, torch.nn.Module)
                               else None)
    if device is None:
        params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    args = dict(model_args or {})
    tokenizer_fp = fingerprint_tokenizer(tokenizer) if tokenizer is not None else None
    student_fp = None
    if student_tokenizer is not None:
        if tokenizer_fp is None:
            raise ValueError("write_teacher_cache(student_tokenizer=...) without tokenizer=: give "
                             "the teacher's tokenizer too (the cache records both to refuse "
                             "another pair)")
        student_fp = fingerprint_tokenizer(student_tokenizer)
        if student_fp == tokenizer_fp:
            student_fp = None  # one tokenizer: a plain cache

    started = time.perf_counter()
    lock = _lock(folder, rank)  # before anything in the folder is read, cleaned or written
    try:
        writer, summary = _write(model, adaptor, dataloader, folder, k=k, values=values,
                                 vocab_size=vocab_size, sample_ids=sample_ids, tokens=tokens,
                                 teacher_fingerprint=teacher_fingerprint,
                                 tokenizer_fp=tokenizer_fp, student_fp=student_fp,
                                 shard_samples=shard_samples,
                                 device=device, args=args, progress_bar=progress_bar, rank=rank,
                                 world_size=world_size)
        writer.flush()
        writer.save_progress(finished=True)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.barrier()
        if rank == 0 or not distributed:  # without a process group the last rank to finish merges
            finalize_teacher_cache(folder)
        if distributed:
            dist.barrier()
    finally:
        if lock is not None:
            lock.close()
    return summary._replace(seconds=time.perf_counter() - started,
                            finished=(folder / fmt.MANIFEST).exists())


def _write(model: Callable[..., Any], adaptor: Adaptor, dataloader: Iterable[Any], folder: Path,
           *, k: int, values: str, vocab_size: int | None,
           sample_ids: Callable[[Any], Any] | None, tokens: Callable[[Any], Tensor | None] | None,
           teacher_fingerprint: str | None, tokenizer_fp: str | None, student_fp: str | None,
           shard_samples: int, device: Any, args: dict[str, Any], progress_bar: bool | None,
           rank: int, world_size: int) -> tuple[_RankWriter, CacheSummary]:
    """The teacher over the loader into ``rank``'s shards (not flushed, not finished)."""
    cross = student_fp is not None
    cross_config = ({"cross_tokenizer": True, "student_tokenizer_fingerprint": student_fp}
                    if cross else {})
    writer: _RankWriter | None = None
    dtype: np.dtype | None = None
    with_tokens: bool | None = None
    progress_path = folder / fmt.progress_name(rank)
    if progress_path.exists():  # resume: check what is known before any forward, skip done ids
        saved = read_progress(progress_path)["config"]
        check_settings(folder, {"cross_tokenizer": False, **saved}, {
            "cross_tokenizer": cross, **cross_config,
            "k": k, "values": values, "shard_samples": shard_samples, "world_size": world_size,
            "teacher_fingerprint": teacher_fingerprint, "tokenizer_fingerprint": tokenizer_fp,
            **({"vocab_size": vocab_size} if vocab_size is not None else {})})
        writer = _RankWriter(folder, rank, saved)
        with_tokens = bool(saved["with_tokens"])
        dtype = fmt.record_dtype(k, saved["vocab_size"], values, with_tokens, cross)
    order = _LoaderOrder(rank)
    stored_samples = stored_tokens = skipped = 0
    total = len(dataloader) if hasattr(dataloader, "__len__") else None  # type: ignore[arg-type]
    bar = _progress_bar(progress_bar, total, rank)
    try:
        for batch in dataloader:
            ids, batch_T = _split_batch(batch, sample_ids)
            full_batch = batch
            order.add_batch(ids)  # a repeated id is an error, stored before or not
            if writer is not None and not any(writer.wants(i) for i in ids):
                skipped += len(ids)
                if bar is not None:
                    bar.update(1)
                continue
            batch_T = move_to_device(batch_T, device)
            with torch.inference_mode():
                adapted = adapt(adaptor, batch_T, forward(model, batch_T, **args))
            hidden = None
            if not adapted.logits and adapted.lm_hidden is not None \
                    and adapted.lm_hidden.dim() == 3 and adapted.lm_weight is not None:
                hidden = adapted.lm_hidden  # the output layer a block at a time (topk_of_linear)
                batch_size, length = hidden.shape[:2]
                vocab = adapted.lm_weight.size(0)
            elif not adapted.logits or adapted.logits[0].dim() != 3:
                shapes = [tuple(t.shape) for t in adapted.logits]
                raise ValueError(f"the teacher's adaptor must return 'logits' of shape (B, L, V) "
                                 f"(or 'lm_hidden' (B, L, H) with 'lm_weight' (V, H)); got "
                                 f"{shapes or 'none'}")
            else:
                batch_size, length, vocab = adapted.logits[0].shape
            device_rows = (hidden if hidden is not None else adapted.logits[0]).device
            if len(ids) != batch_size:
                raise ValueError(f"the batch has {len(ids)} sample ids but the teacher's logits "
                                 f"have {batch_size} rows ({(batch_size, length, vocab)})")
            if vocab_size is not None and vocab != vocab_size:
                raise ValueError(f"vocab_size={vocab_size} but the teacher's logits have {vocab} "
                                 "classes: pass the teacher's vocabulary size")
            if k > vocab:
                raise ValueError(f"k={k} is larger than the vocabulary ({vocab} classes)")
            mask = (adapted.logits_mask[0] if adapted.logits_mask else adapted.inputs_mask)
            if mask is None:
                mask = torch.ones(batch_size, length, dtype=torch.long, device=device_rows)
            if tuple(mask.shape) != (batch_size, length):
                raise ValueError(f"the teacher's mask has shape {tuple(mask.shape)} but its "
                                 f"rows are ({batch_size}, {length}): expected "
                                 f"({batch_size}, {length})")
            lengths = _row_lengths(mask).tolist()
            batch_tokens = tokens(batch_T) if tokens is not None else None
            if batch_tokens is not None and tuple(batch_tokens.shape) != (batch_size, length):
                batch_tokens = None
            offsets, texts = (_cross_parts(full_batch, batch_size, length) if cross
                              else (None, None))
            if cross and batch_tokens is None:
                raise ValueError("a cross-tokenizer cache stores the teacher's tokens: "
                                 "tokens(batch) found no input ids (B, L) in the teacher's batch")
            if writer is None:
                with_tokens = batch_tokens is not None
                config = {"k": k, "vocab_size": vocab, "values": values,
                          "id_dtype": fmt.id_dtype(vocab).str, "with_tokens": with_tokens,
                          "shard_samples": shard_samples, "world_size": world_size,
                          "teacher_fingerprint": teacher_fingerprint,
                          "tokenizer_fingerprint": tokenizer_fp, **cross_config}
                writer = _RankWriter(folder, rank, config)
                dtype = fmt.record_dtype(k, vocab, values, with_tokens, cross)
            elif vocab != writer.config["vocab_size"]:
                raise ValueError(f"the teacher's logits have {vocab} classes in this batch but "
                                 f"{writer.config['vocab_size']} before (or in the partial cache "
                                 f"in {folder})")
            elif (batch_tokens is not None) != with_tokens:
                raise ValueError("tokens(batch) found input ids in some batches (or in the "
                                 "partial cache) but not in others")
            assert dtype is not None
            from_hidden = None
            if hidden is not None:  # every wanted row of the batch in one pass over the layer
                assert adapted.lm_weight is not None
                wanted = [row for row, i in enumerate(ids) if writer.wants(i)]
                picked = [hidden[row, :lengths[row]] for row in wanted]
                following_tokens = None
                if batch_tokens is not None:
                    following_tokens = torch.cat([torch.cat([
                        batch_tokens[row, 1:lengths[row]].to(hidden.device).long(),
                        torch.zeros(min(1, lengths[row]), dtype=torch.long,
                                    device=hidden.device)]) for row in wanted]
                        or [torch.zeros(0, dtype=torch.long, device=hidden.device)])
                rows_hidden = (torch.cat(picked) if picked
                               else hidden.new_zeros(0, hidden.size(-1)))
                top_all, ids_all, following_all = topk_of_linear(
                    rows_hidden, adapted.lm_weight, adapted.lm_bias, k, following_tokens)
                from_hidden = {}
                first = 0
                for row in wanted:
                    n = lengths[row]
                    part = None if following_all is None else following_all[first:first + n].clone()
                    if part is not None and n:
                        part[-1] = 0.0  # a sample's last row: no following token
                    from_hidden[row] = (top_all[first:first + n], ids_all[first:first + n], part)
                    first += n
            encoded = []  # every row of the batch checked before any is stored
            for row, (sample_id, n) in enumerate(zip(ids, lengths, strict=True)):
                if not writer.wants(sample_id):
                    skipped += 1
                    continue
                scores = following = None
                if from_hidden is not None:
                    top, top_ids, following = from_hidden[row]
                else:
                    scores = torch.log_softmax(adapted.logits[0][row, :n].float(), dim=-1)
                    top, top_ids = scores.topk(k, dim=-1, sorted=True)
                _check_logprobs(sample_id, top)
                extra = None
                if offsets is not None and texts is not None and batch_tokens is not None:
                    extra = _cross_fields(scores, batch_tokens[row, :n], offsets[row, :n],
                                          texts[row], sample_id, following)
                encoded.append((sample_id, fmt.encode(
                    top_ids, top, batch_tokens[row, :n] if batch_tokens is not None else None,
                    dtype, values, extra)))
            for sample_id, records in encoded:
                writer.add(sample_id, records)
                stored_samples += 1
                stored_tokens += len(records)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if writer is None:
        raise ValueError("the dataloader yielded no batch: nothing to cache")
    assert dtype is not None
    return writer, CacheSummary(folder, stored_samples, stored_tokens, skipped, 0.0,
                                float(dtype.itemsize), False)


def _cross_fields(scores: Tensor | None, tokens: Tensor, offsets: Tensor, text: str,
                  sample_id: int, following: Tensor | None = None) -> fmt.CrossFields:
    """One sample's cross-tokenizer fields: ``next[t] = scores[t, tokens[t + 1]]`` (0 on the
    last row; or ``following``, computed so already), its offsets (checked: ``0 <= start <= end
    <= len(text)``), its text's digest."""
    if following is None:
        assert scores is not None
        n = scores.shape[0]
        following = torch.zeros(n, dtype=torch.float32, device=scores.device)
        if n > 1:
            following[:-1] = scores[:-1].gather(
                -1, tokens[1:].to(scores.device).long()[:, None])[:, 0]
    spans = offsets.to(torch.int64).cpu()
    bad = (spans[:, 0] < 0) | (spans[:, 1] < spans[:, 0]) | (spans[:, 1] > len(text))
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise fmt.CacheError(
            f"sample id {sample_id}, position {position}: offsets {spans[position].tolist()} do "
            f"not lie in its text of {len(text)} characters: the offsets must come from the "
            "teacher's tokenizer on that very text (return_offsets_mapping=True)")
    return fmt.CrossFields(following, spans, fmt.text_digest(text))


def _check_logprobs(sample_id: int, top: Tensor) -> None:
    """Refuse a sample whose top-k log-probabilities ``(n, k)`` are NaN, ``+inf`` or positive
    (from NaN or ``+inf`` logits, or a position whose logits are all ``-inf``): stored, they
    would pass every checksum. ``-inf`` (masked classes) is allowed: it is stored as the floor."""
    bad = ~(top <= 0)
    if bool(bad.any()):
        position = int(bad.any(-1).nonzero()[0, 0])
        shown = ", ".join(f"{v:.4g}" for v in top[position, :4].tolist())
        raise fmt.CacheError(
            f"sample id {sample_id}, position {position}: the teacher's top-k log-probabilities "
            f"are [{shown}{', ...' if top.shape[-1] > 4 else ''}] (NaN, +inf or positive): its "
            "logits there hold NaN or +inf, or are all -inf; nothing of this batch was stored. "
            "Fix the teacher (e.g. a float16 overflow: run it in bfloat16 or float32) or mask "
            "that position")



__all__ = ["CacheSummary", "check_settings", "default_tokens", "finalize_teacher_cache",
           "topk_of_linear", "write_teacher_cache"]
