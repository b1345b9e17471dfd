"""``@pytest.mark.slow`` tests of this folder run only when asked for (``-m slow``)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords and item.path.is_relative_to(config.rootpath / "tests" / "composition"):
            item.add_marker(skip)
