"""Helpers for users' own distributed tests (also a pytest plugin: ``pytest_plugins = ["launcher.testing"]``).

Example::

    def check_sum(x):            # module level, so the ranks can import it
        t = torch.tensor([x * (launcher.get_rank() + 1)])
        torch.distributed.all_reduce(t)
        return t.item()

    def test_sum(distributed):
        assert distributed(check_sum, 1.0, world_size=2) == {0: 3.0, 1: 3.0}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from .launching.api import launch


def run_distributed(
    fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout_s: float = 60.0
) -> dict[int, Any]:
    """Run ``fn(*args)`` on ``world_size`` Gloo CPU ranks; ``{rank: result}``, or RankFailure."""
    return launch(fn, nproc=world_size, backend="gloo", args=args, timeout_s=timeout_s, startup_timeout_s=120)


@pytest.fixture
def distributed() -> Callable[..., dict[int, Any]]:
    """The :func:`run_distributed` runner as a fixture."""
    return run_distributed
