"""``atomic_write``: a file replaced in one step, never left half-written.

Shared by the runner (checkpoints and states) and the teacher cache (shards and manifests):
the bytes go to a temporary file beside the target (``.{name}.XXXX.tmp``), are flushed to
disk, and the temporary file is renamed over the target with ``os.replace``. A crash leaves
the old file or the new one; a failed write removes its temporary file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, rename it
    to ``path``; returns ``path`` as a :class:`~pathlib.Path`."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


__all__ = ["atomic_write"]
