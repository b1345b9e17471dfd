"""Structural checks of a cache folder that may be corrupted or hostile, independent of the
checksums (which sit in the same folder and prove nothing against tampering).

Everything here runs when a cache is opened (or a writer resumes), never per sample: the
manifest's fields and types, shard names that are plain names inside the folder, ``.npy`` headers
parsed without loading (no pickles: object dtypes are refused from the header) and checked
against the file's size before any memory map, and the index checked with vectorised NumPy
(sorted unique ids, shards that exist, row ranges inside their shard that do not overlap). Each
failure is a :class:`CacheError` naming the file and the field.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import _format as fmt

SHARD_NAME = re.compile(r"rank\d{5,}-shard\d{5,}")
"""A shard's name: its files are ``{name}.rows.npy`` and ``{name}.index.npy`` in the cache
folder. Any other name (a path, ``..``, an absolute path) is refused."""

MAX_K = 2**20
"""The largest ``k`` a cache may hold (a record's fields are NumPy sub-arrays of ``k`` values)."""

INT64 = np.dtype("<i8")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is a :class:`CacheError`."""
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise fmt.CacheError(f"{path}: not valid JSON ({type(error).__name__}: "
                             f"{str(error)[:200]})") from error
    if not isinstance(value, dict):
        raise fmt.CacheError(f"{path}: not a JSON object (it holds {type(value).__name__})")
    return value


def check_shards(path: Path, shards: Any, *, field: str = "shards") -> list[dict[str, Any]]:
    """The shard list of a manifest or progress file: plain distinct names, checksums, counts."""
    if not isinstance(shards, list):
        raise fmt.CacheError(f"{path}: {field} is a {type(shards).__name__}, expected a list of "
                             "shards")
    seen: dict[str, int] = {}
    for number, shard in enumerate(shards):
        where = f"{path}: {field}[{number}]"
        if not isinstance(shard, dict):
            raise fmt.CacheError(f"{where} is a {type(shard).__name__}, expected an object")
        name = shard.get("name")
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
            raise fmt.CacheError(
                f"{where}.name {name!r} is not a shard name of this format (rankNNNNN-shardNNNNN):"
                " shard files must be plain names inside the cache folder; the folder was not "
                "written by purekd (or was altered): refusing to open files it names")
        if name in seen:
            raise fmt.CacheError(f"{where}.name {name!r} repeats {field}[{seen[name]}]")
        seen[name] = number
        sums = shard.get("sha256")
        if not (isinstance(sums, dict)
                and all(isinstance(sums.get(s), str) and _SHA256.fullmatch(sums[s])
                        for s in ("rows", "index"))):
            raise fmt.CacheError(f"{where}.sha256 is {sums!r}, expected {{'rows': hex digest, "
                                 "'index': hex digest}")
        for key in ("samples", "tokens", "rank"):
            if not (_int(shard.get(key)) and shard[key] >= 0):
                raise fmt.CacheError(f"{where}.{key} is {shard.get(key)!r}, expected a "
                                     "non-negative integer")
    return shards


class Settings(NamedTuple):
    k: int
    vocab_size: int
    values: str
    with_tokens: bool
    dtype: np.dtype
    samples: int
    tokens: int
    shards: list[dict[str, Any]]
    cross: bool = False


def check_manifest(path: Path, manifest: dict[str, Any]) -> Settings:
    """Every field the reader uses, typed and consistent (``k``, ``vocab_size``, ``values``,
    ``with_tokens``, ``id_dtype``, ``record_bytes``, ``samples``, ``tokens``, ``index_sha256``,
    ``shards``)."""
    def need(key: str) -> Any:
        if key not in manifest:
            raise fmt.CacheError(f"{path}: no {key!r} field; the manifest is incomplete")
        return manifest[key]

    vocab = need("vocab_size")
    if not (_int(vocab) and 1 <= vocab < 2**63):
        raise fmt.CacheError(f"{path}: vocab_size={vocab!r} is not a positive integer")
    k = need("k")
    if not (_int(k) and k >= 1):
        raise fmt.CacheError(f"{path}: k={k!r} is not a positive integer")
    if k > min(vocab, MAX_K):
        raise fmt.CacheError(f"{path}: k={k} is out of range: k is at most the vocabulary size "
                             f"(vocab_size={vocab}) and at most {MAX_K}")
    values = need("values")
    if values not in fmt.VALUE_DTYPES:
        raise fmt.CacheError(f"{path}: values={values!r} is not one of {fmt.VALUE_DTYPES}")
    with_tokens = need("with_tokens")
    if not isinstance(with_tokens, bool):
        raise fmt.CacheError(f"{path}: with_tokens={with_tokens!r} is not true or false")
    ids = need("id_dtype")
    if ids != fmt.id_dtype(vocab).str:
        raise fmt.CacheError(f"{path}: id_dtype={ids!r} does not match the vocabulary: {vocab} "
                             f"ids are stored as {fmt.id_dtype(vocab).str!r}")
    cross = manifest.get("cross_tokenizer", False)
    if manifest.get("version") == fmt.CROSS_VERSION:
        if cross is not True:
            raise fmt.CacheError(f"{path}: version {fmt.CROSS_VERSION} is a cross-tokenizer "
                                 f"cache, but cross_tokenizer={cross!r}")
        if not with_tokens:
            raise fmt.CacheError(f"{path}: a cross-tokenizer cache stores the teacher's tokens, "
                                 "but with_tokens=false")
        student = manifest.get("student_tokenizer_fingerprint")
        if not (isinstance(student, str) and student):
            raise fmt.CacheError(f"{path}: student_tokenizer_fingerprint={student!r}: a "
                                 "cross-tokenizer cache records the student's tokenizer")
    elif cross is not False:
        raise fmt.CacheError(f"{path}: cross_tokenizer={cross!r} in a version "
                             f"{manifest.get('version')!r} manifest (cross-tokenizer caches are "
                             f"version {fmt.CROSS_VERSION})")
    dtype = fmt.record_dtype(k, vocab, values, with_tokens, cross)
    record_bytes = need("record_bytes")
    if record_bytes != dtype.itemsize:
        raise fmt.CacheError(f"{path}: record_bytes={record_bytes!r} does not match: k={k}, "
                             f"vocab_size={vocab}, values={values!r} make records of "
                             f"{dtype.itemsize} bytes")
    for key in ("samples", "tokens"):
        if not (_int(need(key)) and manifest[key] >= 0):
            raise fmt.CacheError(f"{path}: {key}={manifest[key]!r} is not a non-negative "
                                 "integer")
    index_sum = need("index_sha256")
    if not (isinstance(index_sum, str) and _SHA256.fullmatch(index_sum)):
        raise fmt.CacheError(f"{path}: index_sha256={index_sum!r} is not a hex sha256 digest")
    shards = check_shards(path, need("shards"))
    return Settings(k, vocab, values, with_tokens, dtype, manifest["samples"],
                    manifest["tokens"], shards, cross)


def inside(root: Path, path: Path) -> Path:
    """``path``, refused if it (or a link it goes through) leads outside ``root`` (resolved),
    or if it exists but is not a regular file (a folder, a pipe that would block, a device)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise fmt.CacheError(f"{path}: a link to {resolved}, outside the cache folder {root}: "
                             "refusing to read it (copy the file into the folder instead)")
    if path.exists() and not path.is_file():
        raise fmt.CacheError(f"{path}: not a regular file (a folder, pipe, socket or device): "
                             "refusing to read it")
    return path


_REPAIR = ("write the cache again (or rerun the writer with the same arguments: it rewrites the "
           "shards that fail their checksum)")


class Header(NamedTuple):
    """A ``.npy`` file's header: the array's dtype and shape, where its data starts, and how
    many bytes of data the file holds after the header."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    data_bytes: int


def read_header(path: Path, what: str) -> Header:
    """Parse a ``.npy`` header without reading the data; refuse object dtypes (pickles)."""
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(file)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(file)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = file.tell()
            size = os.fstat(file.fileno()).st_size
    except FileNotFoundError as error:
        raise fmt.CacheError(f"{what} is missing: {path} does not exist; the cache is "
                             "incomplete (copy the whole folder, or write it again)") from error
    except OSError as error:
        raise fmt.CacheError(f"{path.name}: cannot be read ({error})") from error
    except (ValueError, EOFError, SyntaxError, TypeError) as error:
        raise fmt.CacheError(f"{path.name}: not a NumPy .npy file the writer wrote ({error})"
                             ) from error
    if any(not isinstance(n, int) or n < 0 for n in shape):
        raise fmt.CacheError(f"{path.name}: the header says shape {shape}, with a negative "
                             f"dimension; {_REPAIR}")
    if dtype.hasobject:
        raise fmt.CacheError(f"{path.name}: dtype object, but a cache holds numbers only: an "
                             "object array holds pickled Python objects, which are never loaded")
    return Header(dtype, tuple(shape), offset, size - offset)


def require_size(path: Path, header: Header) -> None:
    """Refuse a file whose data is not ``shape x itemsize`` bytes (truncated or padded), before
    anything maps or reads it."""
    expected = int(np.prod(header.shape, dtype=object)) * header.dtype.itemsize
    if header.data_bytes == expected:
        return
    if len(header.shape) == 1 and header.dtype.names:
        said = f"{header.shape[0]} records of {header.dtype.itemsize} bytes"
    else:
        said = f"shape {header.shape} of {_dtype_name(header.dtype)}"
    raise fmt.CacheError(f"{path.name}: truncated or padded: the header says {said} "
                         f"({expected} bytes of data) but the file holds {header.data_bytes} "
                         f"bytes of data; {_REPAIR}")


def _dtype_name(dtype: np.dtype) -> str:
    return str(dtype) if dtype.names is None else "records"


def read_int64_table(path: Path, what: str, columns: int, layout: str) -> np.ndarray:
    """An ``(n, columns)`` int64 ``.npy`` file, header and size checked before it is read."""
    header = read_header(path, what)
    if header.dtype.kind != "i" or header.dtype.itemsize != 8:
        raise fmt.CacheError(f"{path.name}: dtype {_dtype_name(header.dtype)}, expected int64 "
                             f"rows {layout}")
    if len(header.shape) != 2 or header.shape[1] != columns:
        raise fmt.CacheError(f"{path.name}: shape {header.shape}, expected (samples, {columns}) "
                             f"rows {layout}")
    require_size(path, header)
    return np.load(path, allow_pickle=False).astype(INT64, copy=False)


def check_index(path: Path, index: np.ndarray, shard_records: Sequence[int],
                names: Sequence[str]) -> None:
    """``index`` ``(n, 4)`` rows ``[sample id, shard, first row, length]``: ids strictly
    increasing, shards that exist, rows ``first .. first + length`` inside the shard's
    ``shard_records[shard]`` records, no record shared by two samples."""
    ids, shard, start, length = (np.ascontiguousarray(index[:, c]) for c in range(4))

    def row(r: int) -> str:
        return f"{path.name}: row {r} (sample id {int(ids[r])})"

    bad = np.flatnonzero(ids[1:] <= ids[:-1])
    if len(bad):
        r = int(bad[0]) + 1
        raise fmt.CacheError(f"{path.name}: sample ids are not strictly increasing: row {r} "
                             f"(sample id {int(ids[r])}) after row {r - 1} (sample id "
                             f"{int(ids[r - 1])}); the index is corrupted: write the cache again")
    bad = np.flatnonzero((shard < 0) | (shard >= len(names)))
    if len(bad):
        r = int(bad[0])
        raise fmt.CacheError(f"{row(r)}: shard {int(shard[r])}, but the manifest lists "
                             f"{len(names)} shards")
    for column, what in ((start, "first row"), (length, "length")):
        bad = np.flatnonzero(column < 0)
        if len(bad):
            r = int(bad[0])
            raise fmt.CacheError(f"{row(r)}: a negative {what} ({int(column[r])})")
    capacity = np.asarray(shard_records, dtype=np.int64)[shard]
    bad = np.flatnonzero((start > capacity) | (length > capacity - start))  # no overflow
    if len(bad):
        r = int(bad[0])
        s = int(shard[r])
        raise fmt.CacheError(f"{row(r)}: rows {int(start[r])}..{int(start[r]) + int(length[r])} "
                             f"of shard {s} ({names[s]}), which holds {int(capacity[r])} records")
    # The ranges laid on one line (shard after shard) are disjoint iff, with the starts and the
    # ends sorted independently, no start falls before the end ahead of it (an empty range is
    # a point and shares nothing): two plain sorts (none when the ranges are already in id
    # order); the rows are looked for only on failure.
    line = np.concatenate([[0], np.cumsum(shard_records, dtype=np.int64)])[shard]
    line += start
    ends = line + length
    if len(line) < 2:
        return
    if bool((line[1:] >= line[:-1]).all()):  # written in id order: no sort needed
        disjoint = ((line[1:] >= np.maximum.accumulate(ends)[:-1]) | (length[1:] == 0)).all()
    else:
        disjoint = (np.sort(line)[1:] >= np.sort(ends)[:-1]).all()
    if not disjoint:
        rows = np.flatnonzero(length > 0)
        order = rows[np.argsort(line[rows], kind="stable")]
        reach = np.maximum.accumulate(ends[order])
        k = int(np.flatnonzero(line[order[1:]] < reach[:-1])[0]) + 1
        later = int(order[k])
        earlier = int(order[np.flatnonzero(ends[order[:k]] > line[later])[0]])
        a, b = sorted((earlier, later))
        raise fmt.CacheError(f"{path.name}: rows {a} (sample id {int(ids[a])}) and {b} (sample "
                             f"id {int(ids[b])}) share records of shard {int(shard[a])}; the "
                             "index is corrupted: write the cache again")


def merge_shard_indexes(pieces: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The cache's index from the shards' own ``(n, 2)`` ``[sample id, length]`` indexes (shard
    order): rows ``[sample id, shard, first row, length]`` sorted by id, the first copy of a
    repeated id kept; and ``(m, 2)`` ``[kept row, dropped row]`` pairs of the repeats, as rows
    of the unsorted concatenation (for checking that they are the same sample)."""
    tables = []
    for number, index in enumerate(pieces):
        starts = np.concatenate([[0], np.cumsum(index[:, 1])[:-1]]).astype(np.int64)
        tables.append(np.stack([index[:, 0], np.full(len(index), number, np.int64), starts,
                                index[:, 1]], axis=1).reshape(-1, 4))
    merged = np.concatenate(tables) if tables else np.zeros((0, 4), np.int64)
    order = np.argsort(merged[:, 0], kind="stable")  # lowest rank, earliest shard first
    ids = merged[order, 0]
    repeat = np.flatnonzero(ids[1:] == ids[:-1]) + 1
    first = np.maximum.accumulate(np.where(np.r_[True, ids[1:] != ids[:-1]],
                                           np.arange(len(ids)), 0)) if len(ids) else ids
    pairs = np.stack([order[first[repeat]], order[repeat]], axis=1).reshape(-1, 2)
    keep = np.ones(len(ids), dtype=bool)
    keep[repeat] = False
    return np.ascontiguousarray(merged[order][keep]), pairs


_FLOAT_BITS = {"float16": (np.uint16, 0x8000, 0x7C00), "bfloat16": (np.uint16, 0x8000, 0x7F80),
               "float32": (np.uint32, 0x80000000, 0x7F800000)}


def _out_of_range(values: np.ndarray, size: int) -> np.ndarray | None:
    """Per record: an entry outside ``0 .. size - 1`` (``None`` when there is none; the
    reductions first, the per-record mask only when one fails)."""
    if not values.size:
        return None
    if values.max() < size and (values.dtype.kind == "u" or values.min() >= 0):
        return None
    bad = np.asarray((values >= size) | (values < 0))
    return np.asarray(bad.reshape(len(values), -1).any(-1))


def _not_log_probabilities(raw: np.ndarray, values: str) -> np.ndarray | None:
    """Per record: a log-probability that is NaN, ``+inf`` or ``> 0`` (``-inf`` and ``±0`` are
    fine), from the IEEE bit patterns: a clear sign bit on a non-zero value, or an exponent of
    all ones with a non-zero mantissa (NaN). ``None`` when there is none."""
    unsigned, sign, infinity = _FLOAT_BITS[values]
    bits = np.ascontiguousarray(raw).view(unsigned)
    if not bits.size:
        return None
    magnitude = bits & (sign - 1)
    if bits.min() >= sign and magnitude.max() <= infinity:
        return None
    bad = np.asarray(((bits < sign) & (bits != 0)) | (magnitude > infinity))
    return np.asarray(bad.reshape(len(bits), -1).any(-1))


def check_records(path: Path, rows: np.ndarray, vocab_size: int, values: str,
                  chunk: int = 1 << 16) -> None:
    """Every record's ids and token in ``0 .. vocab_size - 1``, its log-probabilities ``<= 0``
    and not NaN (for ``q8``: its top value ``<= 0``, its step finite and ``>= 0``). Vectorised
    per block of ``chunk`` records, on the bit patterns (a cost of the order of the sha256)."""
    names = rows.dtype.names or ()
    for begin in range(0, len(rows), chunk):
        block = rows[begin:begin + chunk]
        problems: list[tuple[np.ndarray | None, str]] = [
            (_out_of_range(block["ids"], vocab_size), f"ids outside 0..{vocab_size - 1}")]
        if "token" in names:
            problems.append((_out_of_range(block["token"], vocab_size),
                             f"input tokens outside 0..{vocab_size - 1}"))
        if values == "q8":
            top, step = block["top"].astype(np.float32), block["step"].astype(np.float32)
            q8 = ~(top <= 0) | ~(step >= 0) | ~np.isfinite(step)
            problems.append((q8 if q8.any() else None,
                             "a q8 top value that is NaN or positive, or a bad step"))
        else:
            problems.append((_not_log_probabilities(block["logprobs"], values),
                             "log-probabilities that are NaN, +inf or positive"))
        if "next" in names:
            problems.append((_not_log_probabilities(block["next"], "float32"),
                             "a next-token log-probability that is NaN, +inf or positive"))
            offsets = block["offsets"]
            reversed_ = offsets[:, 0] > offsets[:, 1]
            problems.append((reversed_ if reversed_.any() else None,
                             "character offsets whose start is after their end"))
        for bad, what in problems:
            if bad is not None and bad.any():  # (+0.0 passes the quick test's bounds only here)
                where = int(np.flatnonzero(bad)[0])
                raise fmt.CacheError(f"{path.name}: record {begin + where} holds {what}; the "
                                     "cache was not written by this version's writer (or was "
                                     "altered): write it again")


__all__ = ["INT64", "MAX_K", "SHARD_NAME", "Header", "Settings", "check_index", "check_manifest",
           "check_records", "check_shards", "inside", "load_json_object", "merge_shard_indexes",
           "read_header", "read_int64_table", "require_size"]
