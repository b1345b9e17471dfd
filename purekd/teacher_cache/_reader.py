"""Reading a top-k teacher cache: the manifest checked against what the caller expects, every
file against its checksum, and each sample's rows looked up by its id in memory-mapped shards."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import _format as fmt
from ._fingerprint import fingerprint_model, fingerprint_tokenizer


class MissingSamplesError(fmt.CacheError, KeyError):
    """Sample ids that the cache does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CachedSample(NamedTuple):
    """One sample's cached rows: ``topk_ids`` ``(length, k)`` int64, ``topk_logprobs``
    ``(length, k)`` float32 (descending), ``tokens`` ``(length,)`` int64 or ``None``."""

    topk_ids: Tensor
    topk_logprobs: Tensor
    tokens: Tensor | None


class TeacherCache:
    """A finished cache, opened for random access by sample id.

    Checked at opening, each failure a :class:`CacheError` (a ``ValueError``) saying what to do:
    the manifest's format; ``vocab_size`` (the student's vocabulary) and ``k`` when given;
    ``tokenizer`` (a tokenizer, vocabulary or fingerprint) and ``teacher`` (a module or
    fingerprint) against the fingerprints the writer recorded; and, with ``verify=True``, the
    sha256 of the index and of every shard (the failing shard is named).
    """

    def __init__(self, path: str | os.PathLike[str], *, vocab_size: int | None = None,
                 k: int | None = None, tokenizer: Any = None, teacher: Any = None,
                 verify: bool = True):
        self.path = Path(path)
        manifest_path = self.path / fmt.MANIFEST
        if not manifest_path.exists():
            partial = sorted(p.name for p in self.path.glob("rank*.progress.json")) if self.path.is_dir() else []
            hint = (f"the folder holds an unfinished cache ({', '.join(partial)}): run the writer "
                    "again with the same arguments to finish it" if partial
                    else "write one with purekd.teacher_cache.write_teacher_cache or "
                         "`purekd cache-teacher`")
            raise fmt.CacheError(f"{self.path}: no {fmt.MANIFEST}, so not a finished teacher "
                                 f"cache; {hint}")
        try:
            manifest = fmt.load_json(manifest_path)
        except ValueError as error:
            raise fmt.CacheError(f"{manifest_path}: not valid JSON ({error})") from error
        if manifest.get("format") != fmt.FORMAT or manifest.get("version") != fmt.VERSION:
            raise fmt.CacheError(f"{manifest_path}: not a {fmt.FORMAT} manifest of version "
                                 f"{fmt.VERSION} (format {manifest.get('format')!r}, version "
                                 f"{manifest.get('version')!r})")
        self.manifest = manifest
        self.k: int = manifest["k"]
        self.vocab_size: int = manifest["vocab_size"]
        self.values: str = manifest["values"]
        self.with_tokens: bool = manifest["with_tokens"]
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise fmt.CacheError(
                f"vocab_size={vocab_size} but the cache at {self.path} was written for a "
                f"vocabulary of {self.vocab_size}: the student and the cached teacher must share "
                "one vocabulary (slice the student's logits to the shared vocabulary, or write "
                "the cache with the right teacher)")
        if k is not None and k != self.k:
            raise fmt.CacheError(f"k={k} but the cache at {self.path} holds the top {self.k}")
        if tokenizer is not None:
            expected = fingerprint_tokenizer(tokenizer)
            recorded = manifest.get("tokenizer_fingerprint")
            if recorded is None:
                raise fmt.CacheError(
                    f"the cache at {self.path} records no tokenizer fingerprint, so the "
                    "tokenizer cannot be checked: write it with tokenizer=..., or open it "
                    "without tokenizer=")
            if recorded != expected:
                raise fmt.CacheError(
                    f"tokenizer fingerprint mismatch: the cache at {self.path} was written with "
                    f"tokenizer {recorded[:16]}…, this one is {expected[:16]}…; the cached ids "
                    "would mean other tokens. Use the tokenizer the cache was written with, or "
                    "write a new cache")
        if teacher is not None:
            expected = teacher if isinstance(teacher, str) else fingerprint_model(teacher)
            recorded = manifest.get("teacher_fingerprint")
            if recorded != expected:
                raise fmt.CacheError(
                    f"teacher fingerprint mismatch: the cache at {self.path} was written by "
                    f"teacher {str(recorded)[:16]}…, the given one is {expected[:16]}…")
        self.dtype = fmt.record_dtype(self.k, self.vocab_size, self.values, self.with_tokens)
        self.shards: list[dict[str, Any]] = list(manifest["shards"])
        if verify:
            self.verify()
        self.index = np.load(self.path / fmt.INDEX)
        if self.index.ndim != 2 or self.index.shape[1] != 4:
            raise fmt.CacheError(f"{self.path / fmt.INDEX}: expected (samples, 4) rows")
        self._maps: dict[int, np.ndarray] = {}

    def verify(self) -> None:
        """Check the sha256 of the index and every shard file; raise naming the first bad one."""
        checks = [(self.path / fmt.INDEX, self.manifest["index_sha256"], "the index")]
        for shard in self.shards:
            for suffix in ("rows", "index"):
                checks.append((self.path / f"{shard['name']}.{suffix}.npy",
                               shard["sha256"][suffix], f"shard {shard['name']}"))
        for path, expected, what in checks:
            if not path.exists():
                raise fmt.CacheError(f"{what} is missing: {path} does not exist; the cache is "
                                     "incomplete (copy the whole folder, or write it again)")
            if fmt.sha256(path) != expected:
                raise fmt.CacheError(
                    f"{what} fails its checksum: {path.name} is not the file the writer wrote "
                    "(corrupted or replaced); delete manifest.json and run the writer again "
                    "with the same arguments: it rewrites the shards that fail their checksum")

    # -- lookup ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.index)

    @property
    def sample_ids(self) -> np.ndarray:
        """Every stored sample id, ascending."""
        return self.index[:, 0]

    @property
    def lengths(self) -> np.ndarray:
        """Each sample's stored rows, in the order of :attr:`sample_ids`."""
        return self.index[:, 3]

    def __contains__(self, sample_id: object) -> bool:
        try:
            return bool(len(self.missing([int(sample_id)])) == 0)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        where = np.searchsorted(self.index[:, 0], ids)
        where = np.minimum(where, max(len(self.index) - 1, 0))
        found = (self.index[where, 0] == ids) if len(self.index) else np.zeros(len(ids), bool)
        return np.where(found, where, -1)

    def missing(self, sample_ids: Iterable[int]) -> np.ndarray:
        """The ids among ``sample_ids`` that the cache does not hold."""
        ids = np.asarray(list(sample_ids), dtype=np.int64)
        return ids[self._positions(ids) < 0]

    def require(self, sample_ids: Iterable[int]) -> None:
        """Raise :class:`MissingSamplesError` unless every id is stored."""
        ids = np.asarray(list(sample_ids), dtype=np.int64)
        absent = self.missing(ids)
        if len(absent):
            shown = ", ".join(str(int(i)) for i in absent[:10])
            raise MissingSamplesError(
                f"{len(absent)} of {len(ids)} sample ids are not in the cache at {self.path} "
                f"(e.g. {shown}; it holds {len(self)} samples, ids {self._id_range()}): write "
                "the cache over the same data set, with the same sample ids")

    def _id_range(self) -> str:
        if not len(self.index):
            return "none"
        return f"{int(self.index[0, 0])}..{int(self.index[-1, 0])}"

    def length(self, sample_id: int) -> int:
        """How many rows (tokens) the cache holds for ``sample_id``."""
        return int(self.index[self._row(sample_id), 3])

    def _row(self, sample_id: int) -> int:
        position = int(self._positions(np.asarray([sample_id], dtype=np.int64))[0])
        if position < 0:
            self.require([sample_id])
        return position

    def _shard(self, number: int) -> np.ndarray:
        rows = self._maps.get(number)
        if rows is None:
            path = self.path / f"{self.shards[number]['name']}.rows.npy"
            rows = np.load(path, mmap_mode="r")
            if rows.dtype != self.dtype:
                raise fmt.CacheError(f"{path.name}: records of dtype {rows.dtype}, the manifest "
                                     f"says {self.dtype}")
            self._maps[number] = rows
        return rows

    def records(self, sample_id: int) -> np.ndarray:
        """The raw records of one sample (a read-only memory-mapped view)."""
        _, shard, start, length = (int(v) for v in self.index[self._row(sample_id)])
        return self._shard(shard)[start:start + length]

    def __getitem__(self, sample_id: int) -> CachedSample:
        records = self.records(sample_id)
        tokens = (torch.from_numpy(fmt.field(records, "token").astype(np.int64))
                  if self.with_tokens else None)
        return CachedSample(fmt.decode_ids(records), fmt.decode_logprobs(records, self.values),
                            tokens)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen their own maps
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def __repr__(self) -> str:
        return (f"TeacherCache({str(self.path)!r}, samples={len(self)}, k={self.k}, "
                f"vocab_size={self.vocab_size}, values={self.values!r})")


__all__ = ["CachedSample", "MissingSamplesError", "TeacherCache"]
