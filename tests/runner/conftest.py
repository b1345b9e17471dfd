"""Runner tests: one intra-op thread (tiny models; on a busy 2-core machine extra threads only
contend, making a 0.3 s run take seconds)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
