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
from . import _validate as check
from ._fingerprint import fingerprint_model, fingerprint_tokenizer


class MissingSamplesError(fmt.CacheError, KeyError):
    """Sample ids that the cache does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CachedSample(NamedTuple):
    """One sample's cached rows: ``topk_ids`` ``(length, k)`` int64, ``topk_logprobs``
    ``(length, k)`` float32 (descending), ``tokens`` ``(length,)`` int64 or ``None``; from a
    cross-tokenizer cache also ``next_logprobs`` ``(length,)`` float32 (the log-probability of
    the token following each row), ``offsets`` ``(length, 2)`` int64 (character offsets in the
    text) and ``text_digest`` (:func:`~purekd.teacher_cache._format.text_digest` of the text),
    else ``None``."""

    topk_ids: Tensor
    topk_logprobs: Tensor
    tokens: Tensor | None
    next_logprobs: Tensor | None = None
    offsets: Tensor | None = None
    text_digest: int | None = None


class TeacherCache:
    """A finished cache, opened for random access by sample id.

    Checked at opening, each failure a :class:`CacheError` (a ``ValueError``) naming the file
    and the field, and saying what to do:

    * always (cheap: the manifest, the ``.npy`` headers and the index, no record read): the
      manifest's format, version and every field it uses (types, ``k <= vocab_size``, the record
      layout); shard names that are plain names inside the folder (no path, no link leading
      out); every file's header (no object dtype: nothing is unpickled) and size against that
      header before any memory map; ``index.npy`` with vectorised checks (ids strictly
      increasing, shards that exist, row ranges inside their shard and not shared);
    * ``vocab_size`` (the student's vocabulary) and ``k`` when given; ``tokenizer`` (a tokenizer,
      vocabulary or fingerprint) and ``teacher`` (a module or fingerprint) against the
      fingerprints the writer recorded;
    * with ``verify=True`` (reads every byte): the sha256 of the index and of every shard (the
      failing shard is named), then what the checksums cannot prove since they sit in the same
      manifest: ``index.npy`` equals the index the shards' own indexes give, and every record's
      ids and tokens are in the vocabulary and its log-probabilities ``<= 0`` (not NaN).
    """

    def __init__(self, path: str | os.PathLike[str], *, vocab_size: int | None = None,
                 k: int | None = None, tokenizer: Any = None, teacher: Any = None,
                 student_tokenizer: Any = None, verify: bool = True):
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
        self.root = self.path.resolve()
        manifest = check.load_json_object(check.inside(self.root, manifest_path))
        if manifest.get("format") != fmt.FORMAT or manifest.get("version") not in fmt.VERSIONS:
            raise fmt.CacheError(f"{manifest_path}: not a {fmt.FORMAT} manifest of version "
                                 f"{' or '.join(map(str, fmt.VERSIONS))} (format "
                                 f"{manifest.get('format')!r}, version "
                                 f"{manifest.get('version')!r})")
        settings = check.check_manifest(manifest_path, manifest)
        self.manifest = manifest
        self.k: int = settings.k
        self.vocab_size: int = settings.vocab_size
        self.values: str = settings.values
        self.with_tokens: bool = settings.with_tokens
        self.cross_tokenizer: bool = settings.cross
        if vocab_size is not None and vocab_size != self.vocab_size and self.cross_tokenizer:
            raise fmt.CacheError(
                f"vocab_size={vocab_size} but the cross-tokenizer cache at {self.path} holds a "
                f"teacher of vocabulary {self.vocab_size} (vocab_size= is the teacher's here)")
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise fmt.CacheError(
                f"vocab_size={vocab_size} but the cache at {self.path} was written for a "
                f"vocabulary of {self.vocab_size}: the student and the cached teacher must share "
                "one vocabulary (slice the student's logits to the shared vocabulary, or write "
                "the cache with the right teacher)")
        if k is not None and k != self.k:
            raise fmt.CacheError(f"k={k} but the cache at {self.path} holds the top {self.k}")
        self.check_tokenizers(tokenizer_T=tokenizer, tokenizer_S=student_tokenizer)
        if teacher is not None:
            expected = teacher if isinstance(teacher, str) else fingerprint_model(teacher)
            recorded = manifest.get("teacher_fingerprint")
            if recorded != expected:
                raise fmt.CacheError(
                    f"teacher fingerprint mismatch: the cache at {self.path} was written by "
                    f"teacher {str(recorded)[:16]}…, the given one is {expected[:16]}…")
        self.dtype = settings.dtype
        self.shards: list[dict[str, Any]] = settings.shards
        self._maps: dict[int, np.ndarray] = {}
        for path, _, _ in self._files():  # no file the manifest names is read outside the folder
            check.inside(self.root, path)
        if verify:
            self.verify(structure=False)
        self._rows_headers = [self._rows_header(number) for number in range(len(self.shards))]
        index_path = self.path / fmt.INDEX
        self.index = check.read_int64_table(index_path, "the index", 4,
                                            "[sample id, shard, first row, length]")
        check.check_index(index_path, self.index,
                          [header.shape[0] for header in self._rows_headers],
                          [shard["name"] for shard in self.shards])
        if settings.samples != len(self.index):
            raise fmt.CacheError(f"{manifest_path}: samples={settings.samples} but {fmt.INDEX} "
                                 f"holds {len(self.index)}")
        tokens = int(self.index[:, 3].sum())
        if settings.tokens != tokens:
            raise fmt.CacheError(f"{manifest_path}: tokens={settings.tokens} but {fmt.INDEX}'s "
                                 f"lengths sum to {tokens} rows")
        if verify:
            self._verify_structure()

    def check_tokenizers(self, *, tokenizer_T: Any = None, tokenizer_S: Any = None) -> None:
        """Raise a :class:`CacheError` unless ``tokenizer_T`` (the tokenizer the teacher read the
        texts with; for a plain cache, the one tokenizer) and ``tokenizer_S`` (a cross-tokenizer
        cache's student) are those the writer recorded (fingerprints; a tokenizer, a
        vocabulary or a fingerprint string each; ``None`` is not checked)."""
        if tokenizer_T is not None:
            expected = fingerprint_tokenizer(tokenizer_T)
            recorded = self.manifest.get("tokenizer_fingerprint")
            if recorded is None:
                raise fmt.CacheError(
                    f"the cache at {self.path} records no tokenizer fingerprint, so the "
                    "tokenizer cannot be checked: write it with tokenizer=..., or open it "
                    "without tokenizer=")
            if recorded != expected:
                raise fmt.CacheError(
                    f"tokenizer fingerprint mismatch: the cache at {self.path} was written with "
                    f"tokenizer {str(recorded)[:16]}…, this one is {expected[:16]}…; the cached "
                    "ids would mean other tokens. Use the tokenizer the cache was written with, "
                    "or write a new cache")
        self._check_student_tokenizer(tokenizer_S)

    def _check_student_tokenizer(self, student_tokenizer: Any) -> None:
        """A cross-tokenizer cache is for one pair: the student's tokenizer must be the one the
        writer recorded; a plain cache has none (the student shares the teacher's)."""
        if student_tokenizer is None:
            return
        expected = fingerprint_tokenizer(student_tokenizer)
        if not self.cross_tokenizer:
            raise fmt.CacheError(
                f"student_tokenizer= given, but the cache at {self.path} is not a "
                "cross-tokenizer cache: it holds the teacher's top-k over the student's own "
                "tokens (open it with tokenizer=, or write a cross-tokenizer cache with "
                "write_teacher_cache(..., student_tokenizer=...))")
        recorded = str(self.manifest.get("student_tokenizer_fingerprint"))
        if recorded != expected:
            raise fmt.CacheError(
                f"student tokenizer fingerprint mismatch: the cross-tokenizer cache at "
                f"{self.path} was written for the student tokenizer {recorded[:16]}…, this one "
                f"is {expected[:16]}…; its offsets align with another tokenizer pair. Use the "
                "pair the cache was written for, or write a new cache")

    def _files(self) -> list[tuple[Path, str, str]]:
        """Every file of the cache: its path, its sha256 in the manifest and what it is."""
        files = [(self.path / fmt.INDEX, self.manifest["index_sha256"], "the index")]
        for shard in self.shards:
            files += [(self.path / f"{shard['name']}.{suffix}.npy", shard["sha256"][suffix],
                       f"shard {shard['name']}") for suffix in ("rows", "index")]
        return files

    def _rows_header(self, number: int) -> check.Header:
        """Shard ``number``'s records file: the manifest's record layout, one dimension, its size
        on disk, as many records as the manifest says — checked before any memory map."""
        shard = self.shards[number]
        path = self.path / f"{shard['name']}.rows.npy"
        header = check.read_header(path, f"shard {shard['name']}")
        if header.dtype != self.dtype:
            raise fmt.CacheError(
                f"{path.name}: records of dtype {header.dtype}, but the manifest (k={self.k}, "
                f"vocab_size={self.vocab_size}, values={self.values!r}, with_tokens="
                f"{self.with_tokens}) says {self.dtype}")
        if len(header.shape) != 1:
            raise fmt.CacheError(f"{path.name}: shape {header.shape}, expected (records,)")
        check.require_size(path, header)
        if header.shape[0] != shard["tokens"]:
            raise fmt.CacheError(f"{path.name}: {header.shape[0]} records, but "
                                 f"{fmt.MANIFEST}: shards[{number}].tokens says {shard['tokens']}")
        return header

    def verify(self, structure: bool = True) -> None:
        """Check the sha256 of the index and every shard file; raise naming the first bad one.
        With ``structure`` (the default when called by hand) also what :meth:`_verify_structure`
        checks."""
        for path, expected, what in self._files():
            if not check.inside(self.root, path).exists():
                raise fmt.CacheError(f"{what} is missing: {path} does not exist; the cache is "
                                     "incomplete (copy the whole folder, or write it again)")
            if fmt.sha256(path) != expected:
                raise fmt.CacheError(
                    f"{what} fails its checksum: {path.name} is not the file the writer wrote "
                    "(corrupted or replaced); delete manifest.json and run the writer again "
                    "with the same arguments: it rewrites the shards that fail their checksum")
        if structure:
            self._verify_structure()

    def _verify_structure(self) -> None:
        """What the checksums cannot prove (they sit in the same manifest): each shard's own
        index agrees with the manifest and its records file, ``index.npy`` is the one those
        indexes give, and every record's values are in range (ids and tokens in the
        vocabulary, log-probabilities ``<= 0`` and not NaN)."""
        pieces = []
        for number, shard in enumerate(self.shards):
            path = self.path / f"{shard['name']}.index.npy"
            index = check.read_int64_table(path, f"shard {shard['name']}", 2,
                                           "[sample id, length]")
            if len(index) != shard["samples"]:
                raise fmt.CacheError(f"{path.name}: {len(index)} samples, but {fmt.MANIFEST}: "
                                     f"shards[{number}].samples says {shard['samples']}")
            if (index[:, 1] < 0).any() or int(index[:, 1].sum()) != shard["tokens"]:
                raise fmt.CacheError(f"{path.name}: lengths that do not sum to the shard's "
                                     f"{shard['tokens']} records")
            pieces.append(index)
        merged, _ = check.merge_shard_indexes(pieces)
        if merged.shape != self.index.shape or not np.array_equal(merged, self.index):
            if len(merged) != len(self.index):
                raise fmt.CacheError(f"{fmt.INDEX} holds {len(self.index)} samples, the shards' "
                                     f"own indexes give {len(merged)}")
            r = int(np.flatnonzero((merged != self.index).any(1))[0])
            raise fmt.CacheError(
                f"{fmt.INDEX}: row {r} (sample id {int(self.index[r, 0])}) is "
                f"{self.index[r].tolist()}, the shards' own indexes give {merged[r].tolist()}; "
                "the index is corrupted: write the cache again")
        for number in range(len(self.shards)):
            path = self.path / f"{self.shards[number]['name']}.rows.npy"
            check.check_records(path, self._shard(number), self.vocab_size, self.values)

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
            header = self._rows_headers[number]  # checked at opening: layout and size
            path = self.path / f"{self.shards[number]['name']}.rows.npy"
            rows = (np.memmap(path, dtype=header.dtype, mode="r", offset=header.offset,
                              shape=header.shape) if header.shape[0]
                    else np.zeros(0, dtype=header.dtype))
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
        if not self.cross_tokenizer:
            return CachedSample(fmt.decode_ids(records),
                                fmt.decode_logprobs(records, self.values), tokens)
        digests = fmt.field(records, "text")
        return CachedSample(fmt.decode_ids(records), fmt.decode_logprobs(records, self.values),
                            tokens, torch.from_numpy(fmt.field(records, "next")).float(),
                            torch.from_numpy(fmt.field(records, "offsets").astype(np.int64)),
                            int(digests[0]) if len(digests) else None)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen their own maps
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def __repr__(self) -> str:
        cross = ", cross_tokenizer=True" if self.cross_tokenizer else ""
        return (f"TeacherCache({str(self.path)!r}, samples={len(self)}, k={self.k}, "
                f"vocab_size={self.vocab_size}, values={self.values!r}{cross})")


__all__ = ["CachedSample", "MissingSamplesError", "TeacherCache"]
