"""The student for the ecosystem: a ``transformers`` ``save_pretrained`` directory
(``model.safetensors``, ``config.json``, ``generation_config.json``, the tokenizer's files)
that ``AutoModelForCausalLM.from_pretrained`` loads, vLLM serves, lm-eval evaluates, and
llama.cpp's converter turns into GGUF::

    python convert_hf_to_gguf.py OUTPUT_DIR/student --outfile student.gguf

Written atomically: everything goes to a temporary directory beside the target, flushed to
disk, then renamed into place — a reader sees the previous directory or the new one, never a
half-written one (replacing an existing directory takes two renames; a crash between them
leaves the previous one as ``.NAME.old-*`` beside it). Under FSDP2 every rank takes part in
gathering the whole state dict and rank 0 writes it; under DDP rank 0 writes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as file:
                os.fsync(file.fileno())


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_pretrained_student(student: nn.Module, directory: str | os.PathLike[str], *,
                            tokenizer: Any = None, sharded: bool = False) -> Path | None:
    """Write ``student`` (a ``transformers`` ``PreTrainedModel``) and ``tokenizer`` to
    ``directory`` with ``save_pretrained``, atomically; returns the directory on the rank that
    wrote it (0), ``None`` on the others. ``sharded``: the student is sharded with FSDP2, every
    rank must call this (the state dict is gathered whole to rank 0)."""
    state = None
    if sharded:
        from purekd.runner import full_state_dict

        state = full_state_dict(student)
    if _rank() != 0:
        _barrier()
        return None
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp",
                                      dir=target.parent))
    try:
        save: Any = student.save_pretrained
        if state is not None:
            save(temporary, state_dict=state)
        else:
            save(temporary)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(temporary)
        _fsync_tree(temporary)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(temporary, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    finally:
        _barrier()
    return target


__all__ = ["save_pretrained_student"]
