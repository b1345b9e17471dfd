"""Shared helpers for the purekd test suite.

Test modules import the helpers directly (``from tests.conftest import ...``); pytest imports
this module as ``tests.conftest`` too, so both see the same objects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "purekd",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("purekd")


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``, so test data does not depend on the global RNG."""
    return torch.Generator().manual_seed(seed)


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def random_mask(
    gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.long, p: float = 0.5
) -> torch.Tensor:
    """A random 0/1 mask of ``shape`` with at least one 1 in every row (last dimension)."""
    mask = torch.rand(*shape, generator=gen) < p
    keep = torch.randint(shape[-1], (*shape[:-1], 1), generator=gen)
    mask.scatter_(-1, keep, True)
    return mask.to(dtype)


def count_graph_breaks(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """The number of graph breaks Dynamo finds when tracing ``fn(*args, **kwargs)``."""
    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(fn)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return explanation.graph_break_count


def compiled_and_eager(
    fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]]
) -> tuple[list[Any], list[Any]]:
    """``fn(*call)`` for every call, once compiled (``fullgraph=True``) and once eagerly.

    All calls are traced into *one* compiled function, so a loss is compiled once for all the
    cases (masked, unmasked, 3-d, 4-d, ...) under test; ``fullgraph=True`` turns any graph
    break into an error.
    """

    def run_all(calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        return [fn(*call) for call in calls]

    torch._dynamo.reset()
    try:
        compiled = torch.compile(run_all, fullgraph=True)(list(calls))
    finally:
        torch._dynamo.reset()
    return compiled, run_all(calls)


def assert_all_close(
    actual: Sequence[Any], expected: Sequence[Any], atol: float, rtol: float = 1e-6
) -> None:
    """Element-wise closeness of two equally long sequences of tensors.

    The default ``rtol`` of 1e-6 (about 8 float32 ulps) only matters for values well above 1,
    where a compiled kernel that sums in another order may differ by more than ``atol``.
    """
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol)


def clone_tree(value: Any) -> Any:
    """A deep copy of the tensors inside nested tuples / lists / dicts."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(clone_tree(v) for v in value)
    if isinstance(value, dict):
        return {k: clone_tree(v) for k, v in value.items()}
    return value


def assert_tree_equal(actual: Any, expected: Any) -> None:
    """Exact equality (values, shapes and dtypes) of nested tensor structures."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor)
        assert actual.dtype == expected.dtype
        assert torch.equal(actual, expected)
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_tree_equal(a, e)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for k in expected:
            assert_tree_equal(actual[k], expected[k])
    else:
        assert actual == expected


def call_and_check_untouched(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, asserting afterwards that no tensor argument was modified in place."""
    before = clone_tree(args)
    versions = [a._version for a in _tensors(args)]
    result = fn(*args)
    assert_tree_equal(args, before)
    assert [a._version for a in _tensors(args)] == versions, "an input was written in place"
    return result


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def student_grads(
    fn: Callable[..., Any], student: Any, rest: Sequence[Any]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss ``fn(student, *rest)`` and the gradients of its student tensor(s)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in _tensors(student)]
    if isinstance(student, torch.Tensor):
        rebuilt: Any = leaves[0]
    else:
        rebuilt = type(student)(leaves)
    loss = fn(rebuilt, *rest)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss, [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)]


def pytest_configure(config: pytest.Config) -> None:
    # Inductor's warm-up touches torch.jit, which warns on every import in torch 2.13.
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
    )
