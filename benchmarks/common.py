"""Alternate two sides several times in one run and report medians, spread and the ratio."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def alternate(a: Callable[[], float], b: Callable[[], float], rounds: int = 5) -> dict[str, float]:
    """Run ``a`` and ``b`` alternately; each returns a measurement (seconds or a rate).

    Returns the medians of each side and, as ``ratio``, the median over rounds of b/a measured back to back:
    on a shared machine whose speed drifts between rounds, pairing cancels the drift that a ratio of medians
    keeps.
    """
    xs, ys = [], []
    for _ in range(rounds):
        xs.append(a())
        ys.append(b())
    ma, mb = statistics.median(xs), statistics.median(ys)
    return {
        "a": ma,
        "b": mb,
        "a_spread": max(xs) - min(xs),
        "b_spread": max(ys) - min(ys),
        "ratio": paired(xs, ys),
    }


def paired(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Median over rounds of y/x, each pair measured back to back."""
    return statistics.median(y / x for x, y in zip(xs, ys))


def summary(xs: Sequence[float]) -> str:
    """Median and spread of one side's measurements, for a table cell."""
    return f"{statistics.median(xs):.2f} (spread {max(xs) - min(xs):.2f})"


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
