"""Layer 6, beside the runner — the offline teacher: a teacher's top-k next-token
distributions cached on disk once, keyed by sample id, and read back as the plain
``teacher_cache`` value the pure stages take (so training needs no teacher forward and no
teacher model in memory). See ``docs/teacher-cache.md``.

* :func:`write_teacher_cache` runs the teacher over a loader (resumable, one set of shards per
  rank under torchrun); :func:`finalize_teacher_cache` merges the ranks' shards.
* :class:`TeacherCache` opens a finished cache (checks vocabulary size, fingerprints, checksums)
  for memory-mapped lookup by sample id.
* :class:`CachedTeacherDataset` + :class:`CachedCollate` yield ``{'student': batch, 'teacher':
  batch, 'teacher_cache': {'topk_ids', 'topk_logprobs', 'topk_mask'}}``.
* A teacher with another tokenizer than the student's: :class:`TeacherTextCollate` feeds the
  writer (``student_tokenizer=``: a cross-tokenizer cache, which also stores the teacher's
  tokens, offsets and next-token log-probabilities), and :class:`CrossTokenizerCachedDataset`
  + :class:`CrossTokenizerCachedCollate` yield batches with the aligned ``'spans'`` for
  ``kd_loss_type="uld"`` / ``"gold"``.
"""

from ._cross import CrossTokenizerCachedCollate, CrossTokenizerCachedDataset, TeacherTextCollate
from ._dataset import CachedCollate, CachedTeacherDataset, WithSampleIds, pad_teacher_cache
from ._fingerprint import fingerprint_model, fingerprint_tokenizer
from ._format import VALUE_DTYPES, CacheError, bytes_per_token, id_dtype
from ._reader import CachedSample, MissingSamplesError, TeacherCache
from ._writer import CacheSummary, default_tokens, finalize_teacher_cache, write_teacher_cache

__all__ = [
    "VALUE_DTYPES",
    "CacheError",
    "CacheSummary",
    "CachedCollate",
    "CachedSample",
    "CachedTeacherDataset",
    "CrossTokenizerCachedCollate",
    "CrossTokenizerCachedDataset",
    "MissingSamplesError",
    "TeacherCache",
    "TeacherTextCollate",
    "WithSampleIds",
    "bytes_per_token",
    "default_tokens",
    "finalize_teacher_cache",
    "fingerprint_model",
    "fingerprint_tokenizer",
    "id_dtype",
    "pad_teacher_cache",
    "write_teacher_cache",
]
