"""A hostile or corrupted cache folder fails when it is opened, with a CacheError naming the file
and the field — never a NumPy MemoryError / IndexError, never a file outside the folder, never a
pickle run, never a wrong lookup. The manifest's checksums sit in the same folder, so most cases
here are tampered *with the checksums recomputed* (what an attacker would do): the structure is
validated independently of them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from purekd.teacher_cache import CacheError, TeacherCache

from ._helpers import TinyLM, Tokens, write


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache")
    write(TinyLM(seed=0), Tokens(10), out, k=4, shard_samples=4)  # shards of 4, 4 and 2 samples
    return out


@pytest.fixture
def cache(written, tmp_path) -> Path:
    return Path(shutil.copytree(written, tmp_path / "cache"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


def rewrite(folder: Path, change: Any = None) -> None:
    """Apply ``change(manifest)`` and recompute every checksum the manifest holds (a tamperer
    who knows the format)."""
    value = manifest(folder)
    if change is not None:
        change(value)
    if (folder / "index.npy").exists():
        value["index_sha256"] = _sha(folder / "index.npy")
    shards = value.get("shards")
    for shard in shards if isinstance(shards, list) else []:
        if not isinstance(shard.get("sha256"), dict):
            continue
        for suffix in ("rows", "index"):
            path = folder / f"{shard['name']}.{suffix}.npy"
            if path.is_file() and not os.path.isabs(shard["name"]) and ".." not in shard["name"]:
                shard["sha256"][suffix] = _sha(path)
    (folder / "manifest.json").write_text(json.dumps(value))


def raw_npy(path: Path, header: dict[str, Any], data: bytes = b"") -> None:
    """A .npy file with any header (e.g. a shape the bytes do not hold)."""
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, header)
        file.write(data)


def opens(folder: Path, **options: Any) -> list[TeacherCache]:
    """Both ways of opening: with and without checksum verification."""
    return [TeacherCache(folder, **options), TeacherCache(folder, verify=False, **options)]


# -- path traversal ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../outside/x", "ABSOLUTE", "sub/rank00000-shard00000",
                                  "..", "", "rank00000-shard00000\x00"])
def test_shard_names_must_be_plain_names_inside_the_cache(cache, tmp_path, name) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    if name == "ABSOLUTE":
        name = str(outside / "x")
    for suffix in ("rows", "index"):  # a valid shard outside the folder, checksums to match
        shutil.copy(cache / f"rank00000-shard00000.{suffix}.npy", outside / f"x.{suffix}.npy")

    def point_outside(value: dict[str, Any]) -> None:
        value["shards"][0]["name"] = name
        for suffix in ("rows", "index"):
            value["shards"][0]["sha256"][suffix] = _sha(outside / f"x.{suffix}.npy")
    rewrite(cache, point_outside)
    for verify in (True, False):
        with pytest.raises(CacheError, match=r"manifest\.json: shards\[0\]\.name .* is not a "
                                             r"shard name"):
            TeacherCache(cache, verify=verify)


def test_a_shard_file_linking_outside_the_cache_is_refused(cache, tmp_path) -> None:
    outside = tmp_path / "elsewhere.npy"
    target = cache / "rank00000-shard00001.rows.npy"
    shutil.move(target, outside)
    target.symlink_to(outside)
    for verify in (True, False):
        with pytest.raises(CacheError, match=r"rank00000-shard00001\.rows\.npy: a link to .*"
                                             r"outside the cache folder"):
            TeacherCache(cache, verify=verify)
    # a link inside the folder (e.g. deduplicated storage) is fine
    inside = cache / "store"
    inside.mkdir()
    target.unlink()
    shutil.move(outside, inside / "rows.npy")
    target.symlink_to(inside / "rows.npy")
    TeacherCache(cache)


def test_a_resumed_writer_refuses_a_progress_file_pointing_outside(cache, tmp_path) -> None:
    (cache / "manifest.json").unlink()
    progress = json.loads((cache / "rank00000.progress.json").read_text())
    progress["shards"][0]["name"] = "../../etc/passwd"
    (cache / "rank00000.progress.json").write_text(json.dumps(progress))
    with pytest.raises(CacheError, match=r"rank00000\.progress\.json: shards\[0\]\.name "
                                         r"'\.\./\.\./etc/passwd' is not a shard name"):
        write(TinyLM(seed=0), Tokens(10), cache, k=4, shard_samples=4)


# -- the manifest --------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.update(k=10**12), r"manifest\.json: k=1000000000000 .* at most the vocabulary"),
    (lambda m: m.update(k=0), r"manifest\.json: k=0 .* positive integer"),
    (lambda m: m.update(k="4"), r"manifest\.json: k='4' .* positive integer"),
    (lambda m: m.update(k=True), r"manifest\.json: k=True .* positive integer"),
    (lambda m: m.update(vocab_size=-3), r"manifest\.json: vocab_size=-3"),
    (lambda m: m.update(values="float64"), r"manifest\.json: values='float64' .* one of"),
    (lambda m: m.update(with_tokens="yes"), r"manifest\.json: with_tokens='yes' .* true or false"),
    (lambda m: m.update(id_dtype="<u4"), r"manifest\.json: id_dtype='<u4' .* '\|u1'"),
    (lambda m: m.update(record_bytes=3), r"manifest\.json: record_bytes=3 .* records of 13 bytes"),
    (lambda m: m.pop("shards"), r"manifest\.json: no 'shards'"),
    (lambda m: m.update(shards={"a": 1}), r"manifest\.json: shards .* a list"),
    (lambda m: m["shards"].append(dict(m["shards"][0])),
     r"manifest\.json: shards\[3\]\.name 'rank00000-shard00000' repeats shards\[0\]"),
    (lambda m: m["shards"][1].update(sha256="x"), r"manifest\.json: shards\[1\]\.sha256"),
    (lambda m: m["shards"][1].update(tokens=10**15),
     r"rank00000-shard00001\.rows\.npy: \d+ records, but manifest\.json: shards\[1\]\.tokens "
     r"says 1000000000000000"),
    (lambda m: m.update(samples=11), r"manifest\.json: samples=11 but index\.npy holds 10"),
    (lambda m: m.update(tokens=7), r"manifest\.json: tokens=7 but index\.npy's lengths sum to \d+ rows"),
])
def test_manifest_fields_are_checked(cache, change, message) -> None:
    rewrite(cache, change)
    for verify in (True, False):
        with pytest.raises(CacheError, match=message):
            TeacherCache(cache, verify=verify)


@pytest.mark.parametrize("text", ["", "[1, 2]", "{\"format\": ", "\udcff", "null"])
def test_a_manifest_that_is_not_a_json_object(cache, text) -> None:
    (cache / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CacheError, match=r"manifest\.json: not .*JSON"):
        TeacherCache(cache)


def test_a_manifest_of_another_version(cache) -> None:
    rewrite(cache, lambda m: m.update(version=3))
    with pytest.raises(CacheError, match=r"not a purekd-teacher-cache manifest of version 1 or 2 "
                                         r"\(format 'purekd-teacher-cache', version 3\)"):
        TeacherCache(cache)


def test_a_plain_manifest_that_claims_the_cross_tokenizer_version(cache) -> None:
    # version 2 is the cross-tokenizer format: a version 1 cache relabelled is refused
    rewrite(cache, lambda m: m.update(version=2))
    with pytest.raises(CacheError, match=r"manifest\.json: version 2 is a cross-tokenizer cache, "
                                         r"but cross_tokenizer=False"):
        TeacherCache(cache)
    rewrite(cache, lambda m: m.update(version=1, cross_tokenizer=True))
    with pytest.raises(CacheError, match=r"cross_tokenizer=True in a version 1 manifest"):
        TeacherCache(cache)


# -- index.npy -----------------------------------------------------------------------------------

def _index(folder: Path) -> np.ndarray:
    return np.load(folder / "index.npy")


def _save_index(folder: Path, index: np.ndarray) -> None:
    np.save(folder / "index.npy", index)
    rewrite(folder)


def test_an_index_header_with_an_absurd_shape(cache) -> None:
    raw_npy(cache / "index.npy", {"descr": "<i8", "fortran_order": False,
                                  "shape": (10**12, 4)}, b"\0" * 64)
    rewrite(cache)
    for verify in (True, False):
        with pytest.raises(CacheError, match=r"index\.npy: truncated or padded: the header says shape "
                                             r"\(1000000000000, 4\) of int64 .* but the file "
                                             r"holds 64 bytes of data"):
            TeacherCache(cache, verify=verify)


@pytest.mark.parametrize(("header", "message"), [
    ({"descr": "<f8", "fortran_order": False, "shape": (10, 4)}, r"dtype float64, expected int64"),
    ({"descr": "<i8", "fortran_order": False, "shape": (10, 3)}, r"shape \(10, 3\), expected "
                                                                 r"\(samples, 4\)"),
    ({"descr": "<i8", "fortran_order": False, "shape": (40,)}, r"shape \(40,\), expected"),
])
def test_an_index_of_the_wrong_dtype_or_shape(cache, header, message) -> None:
    raw_npy(cache / "index.npy", header, b"\0" * 320)
    rewrite(cache)
    with pytest.raises(CacheError, match=r"index\.npy: " + message):
        TeacherCache(cache, verify=False)


def test_an_object_index_is_refused_and_never_unpickled(cache, tmp_path) -> None:
    marker = tmp_path / "pwned"
    np.save(cache / "index.npy", np.array([Boom(str(marker))] * 3, dtype=object),
            allow_pickle=True)
    rewrite(cache)
    for verify in (True, False):
        with pytest.raises(CacheError, match=r"index\.npy: dtype object.*pickled"):
            TeacherCache(cache, verify=verify)
    assert not marker.exists()


class Boom:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("empty", ["index.npy", "rank00000-shard00001.rows.npy"])
def test_empty_files(cache, empty) -> None:
    (cache / empty).write_bytes(b"")
    rewrite(cache)
    for verify in (True, False):
        with pytest.raises(CacheError, match=rf"{empty.replace('.', '[.]')}: not a NumPy \.npy "
                                             "file"):
            TeacherCache(cache, verify=verify)


def test_an_index_row_pointing_at_a_shard_that_does_not_exist(cache) -> None:
    index = _index(cache)
    index[4, 1] = 7
    _save_index(cache, index)
    for verify in (True, False):
        with pytest.raises(CacheError, match=r"index\.npy: row 4 \(sample id 4\): shard 7, but "
                                             r"the manifest lists 3 shards"):
            TeacherCache(cache, verify=verify)


def test_an_unsorted_index(cache) -> None:
    index = _index(cache)
    index[[2, 3]] = index[[3, 2]]
    _save_index(cache, index)
    for verify in (True, False):
        with pytest.raises(CacheError, match=r"index\.npy: sample ids are not strictly "
                                             r"increasing: row 3 \(sample id 2\) after row 2 "
                                             r"\(sample id 3\)"):
            TeacherCache(cache, verify=verify)
    index[3] = index[2]  # a repeated id
    _save_index(cache, index)
    with pytest.raises(CacheError, match=r"row 3 \(sample id 3\) after row 2 \(sample id 3\)"):
        TeacherCache(cache, verify=False)


@pytest.mark.parametrize(("column", "value", "message"), [
    (2, 10**9, r"rows 1000000000\.\.\d+ of shard 1 \(rank00000-shard00001\), which holds \d+ "
               r"records"),
    (3, 10**6, r"rows \d+\.\.\d+ of shard 1 \(rank00000-shard00001\), which holds \d+ records"),
    (2, -1, r"a negative first row \(-1\)"),
    (3, -2, r"a negative length \(-2\)"),
])
def test_an_index_row_past_its_shards_end(cache, column, value, message) -> None:
    index = _index(cache)
    index[5, column] = value
    _save_index(cache, index)
    for verify in (True, False):
        with pytest.raises(CacheError, match=r"index\.npy: row 5 \(sample id 5\): " + message):
            TeacherCache(cache, verify=verify)


def test_index_rows_that_overlap(cache) -> None:
    """Two samples reading the same records (a corrupted start) pass the bounds; the reader
    refuses them: each record belongs to one sample."""
    index = _index(cache)
    assert index[5, 1] == index[6, 1] == 1
    index[6, 2] = index[5, 2]
    index[6, 3] = min(index[6, 3], index[5, 3])
    _save_index(cache, index)
    for verify in (True, False):
        with pytest.raises(CacheError, match=r"index\.npy: rows? \d+ \(sample id \d+\) and "
                                             r"\d+ \(sample id \d+\) share records of shard 1"):
            TeacherCache(cache, verify=verify)


def test_an_index_that_disagrees_with_the_shards_indexes(cache) -> None:
    """Permuting two samples of equal length passes every structural check of ``index.npy``
    alone; with verify=True it is recomputed from the shards' own indexes and refused."""
    index = _index(cache)
    lengths = index[:, 3]
    a, b = next((i, j) for i in range(len(index)) for j in range(i + 1, len(index))
                if lengths[i] == lengths[j])
    index[[a, b], 1:] = index[[b, a], 1:]
    _save_index(cache, index)
    with pytest.raises(CacheError, match=rf"index\.npy: row {a} \(sample id {a}\) is "
                                         r"\[.*\], the shards' own indexes give \[.*\]"):
        TeacherCache(cache)


# -- shards --------------------------------------------------------------------------------------

def test_a_truncated_shard_with_verify_false(cache) -> None:
    rows = cache / "rank00000-shard00001.rows.npy"
    rows.write_bytes(rows.read_bytes()[:-20])
    with pytest.raises(CacheError, match=r"rank00000-shard00001\.rows\.npy: truncated or "
                                         r"padded: the header says \d+ records of 13 bytes "
                                         r"\(\d+ bytes of data\) but the file holds \d+"):
        TeacherCache(cache, verify=False)
    with pytest.raises(CacheError, match="fails its checksum"):
        TeacherCache(cache)


def test_a_shard_of_records_of_another_layout(cache) -> None:
    rows = cache / "rank00000-shard00002.rows.npy"
    np.save(rows, np.zeros(5, dtype=[("ids", "<u2", (4,))]))
    rewrite(cache)
    for verify in (True, False):
        with pytest.raises(CacheError, match=r"rank00000-shard00002\.rows\.npy: records of dtype "
                                             r".* but the manifest .* says"):
            TeacherCache(cache, verify=verify)


def test_a_shard_header_with_an_absurd_shape(cache) -> None:
    descr = np.lib.format.dtype_to_descr(TeacherCache(cache).dtype)
    raw_npy(cache / "rank00000-shard00000.rows.npy",
            {"descr": descr, "fortran_order": False, "shape": (10**15,)}, b"\0" * 26)
    rewrite(cache)
    for verify in (True, False):
        with pytest.raises(CacheError, match=r"rank00000-shard00000\.rows\.npy: truncated"):
            TeacherCache(cache, verify=verify)


def test_a_missing_shard_with_verify_false(cache) -> None:
    (cache / "rank00000-shard00002.rows.npy").unlink()
    with pytest.raises(CacheError, match=r"shard rank00000-shard00002 is missing"):
        TeacherCache(cache, verify=False)


def test_record_values_are_checked_by_verify(cache) -> None:
    """Records whose ids lie outside the vocabulary or whose log-probabilities are NaN or
    positive (written by hand, or by an older writer) fail ``verify``, naming shard and row."""
    path = cache / "rank00000-shard00001.rows.npy"
    original = np.load(path)
    for field, value, message in [("ids", 200, r"ids outside 0\.\.95"),
                                  ("logprobs", np.nan, r"log-probabilities that are NaN, "
                                                       r"\+inf or positive"),
                                  ("logprobs", 0.5, r"log-probabilities .* positive"),
                                  ("token", 99, r"input tokens outside 0\.\.95")]:
        rows = original.copy()
        rows[field][3] = value
        np.save(path, rows)
        rewrite(cache)
        with pytest.raises(CacheError, match=rf"rank00000-shard00001\.rows\.npy: record 3 "
                                             rf"holds {message}"):
            TeacherCache(cache)
        TeacherCache(cache, verify=False)  # the opt-out reads values as they are


def test_a_shard_swapped_with_another_of_the_same_size(tmp_path) -> None:
    """Caught by the checksums (verify=True); with verify=False by the stored input tokens when
    the data set is checked (``CachedTeacherDataset``)."""
    from purekd.teacher_cache import CachedTeacherDataset

    data = Tokens(8)
    data.items = [item[:3] for item in data.items]  # every sample 3 tokens: equal-size shards
    write(TinyLM(seed=0), data, tmp_path, k=4, shard_samples=4)
    a, b = (tmp_path / f"rank00000-shard0000{i}.rows.npy" for i in (0, 1))
    assert a.stat().st_size == b.stat().st_size
    a.rename(tmp_path / "swap")
    b.rename(a)
    (tmp_path / "swap").rename(b)
    with pytest.raises(CacheError, match="shard rank00000-shard00000 fails its checksum"):
        TeacherCache(tmp_path)
    with pytest.raises(ValueError, match=r"item 0 \(sample id 0\): token 0 is"):
        CachedTeacherDataset(data, TeacherCache(tmp_path, verify=False))


def test_the_untouched_cache_opens(written) -> None:
    for opened in opens(written):
        assert len(opened) == 10 and opened[3].topk_ids.shape[1] == 4


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_or_a_folder_in_place_of_a_shard(cache) -> None:
    """A named pipe would block the reader forever; a folder is no file: both refused."""
    rows = cache / "rank00000-shard00001.rows.npy"
    rows.unlink()
    os.mkfifo(rows)
    for verify in (True, False):
        with pytest.raises(CacheError, match=r"rank00000-shard00001\.rows\.npy: not a regular "
                                             r"file"):
            TeacherCache(cache, verify=verify)
    rows.unlink()
    rows.mkdir()
    with pytest.raises(CacheError, match=r"rank00000-shard00001\.rows\.npy: not a regular file"):
        TeacherCache(cache, verify=False)


def test_a_deeply_nested_manifest(cache) -> None:
    (cache / "manifest.json").write_text("[" * 100_000)
    with pytest.raises(CacheError, match=r"manifest\.json: not valid JSON \(RecursionError"):
        TeacherCache(cache)


def test_a_negative_dimension_in_a_header(cache) -> None:
    raw_npy(cache / "index.npy", {"descr": "<i8", "fortran_order": False, "shape": (-1, 4)})
    rewrite(cache)
    with pytest.raises(CacheError, match=r"index\.npy: the header says shape \(-1, 4\), with a "
                                         r"negative dimension"):
        TeacherCache(cache, verify=False)


@pytest.mark.parametrize("text", ["", "{\"format\": \"purekd-teacher-cache\", \"version\": 1}",
                                  "[]"])
def test_a_resumed_writer_refuses_a_garbled_progress_file(cache, text) -> None:
    (cache / "rank00000.progress.json").write_text(text)
    with pytest.raises(CacheError, match=r"rank00000\.progress\.json: (not valid JSON|not a JSON "
                                         r"object|no 'config' object)"):
        write(TinyLM(seed=0), Tokens(10), cache, k=4, shard_samples=4)


@pytest.mark.parametrize("values", ["float32", "float16", "bfloat16"])
def test_the_bit_pattern_check_equals_the_float_comparison(values) -> None:
    """``verify``'s value check works on IEEE bit patterns (fast); it must flag exactly the
    values a float comparison flags: NaN (either sign), +inf and positives — not -inf, -0, +0."""
    import torch

    from purekd.teacher_cache._validate import _not_log_probabilities

    special = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 1e-30,
               -1e-30, 3.0, -3.0, 65504.0, -1e4]
    gen = np.random.default_rng(0)
    floats = np.concatenate([special, gen.normal(0, 50, 500)]).astype(np.float32)
    tensor = torch.from_numpy(floats)
    if values == "float32":
        raw, decoded = floats, tensor
    elif values == "float16":
        raw, decoded = floats.astype(np.float16), tensor.half().float()
    else:
        raw = tensor.bfloat16().view(torch.int16).numpy().view(np.uint16)
        decoded = tensor.bfloat16().float()
    raw = raw.reshape(-1, 4)
    expected = (~(decoded <= 0)).reshape(-1, 4).any(-1).numpy()
    got = _not_log_probabilities(raw, values)
    assert got is not None and np.array_equal(got, expected)
    fine = raw[~expected]
    assert _not_log_probabilities(fine, values) is None


def test_q8_record_values_are_checked_by_verify(tmp_path) -> None:
    write(TinyLM(seed=0), Tokens(4), tmp_path, k=4, values="q8")
    path = tmp_path / "rank00000-shard00000.rows.npy"
    rows = np.load(path)
    rows["top"][5] = np.float16(np.nan)
    np.save(path, rows)
    rewrite(tmp_path)
    with pytest.raises(CacheError, match=r"rank00000-shard00000\.rows\.npy: record 5 holds a q8 "
                                         r"top value that is NaN or positive"):
        TeacherCache(tmp_path)


def _share(index: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of rows whose non-empty ranges of one shard overlap (brute force)."""
    pairs = set()
    for a in range(len(index)):
        for b in range(a + 1, len(index)):
            (_, sa, xa, na), (_, sb, xb, nb) = index[a], index[b]
            if sa == sb and na and nb and xa < xb + nb and xb < xa + na:
                pairs.add((a, b))
    return pairs


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 12), st.integers(0, 5)),
                min_size=1, max_size=9), st.booleans())
def test_the_overlap_check_equals_brute_force(rows, in_order) -> None:
    """The index check finds shared records with two sorts (or none when the ranges are in id
    order); it must agree with comparing every pair, and name a pair that does share."""
    from purekd.teacher_cache._validate import check_index

    if in_order:  # the ranges in the order of the ids: the check's path without sorting
        rows = sorted(rows)

    index = np.array([(i, s, x, n) for i, (s, x, n) in enumerate(rows)], dtype=np.int64)
    capacity = [20, 20, 20]
    pairs = _share(index)
    if not pairs:
        check_index(Path("index.npy"), index, capacity, ["a", "b", "c"])
        return
    with pytest.raises(CacheError, match="share records") as error:
        check_index(Path("index.npy"), index, capacity, ["a", "b", "c"])
    a, b = (int(v) for v in re.findall(r"rows (\d+) .* and (\d+) ", str(error.value))[0])
    assert (a, b) in pairs
