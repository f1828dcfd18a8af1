"""Confidence intervals used by the reports: Wilson and Newcombe score intervals for proportions (synthetic
accuracy), and a paired bootstrap for the difference of two scores on the same examples (read-twice gain).

A leaf helper: it imports nothing from :mod:`jrt`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Two-sided 95% quantile of the standard normal.
Z95 = 1.959963984540054


def wilson(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``hits / n`` (as fractions)."""
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(h1: int, n1: int, h2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval of ``h1/n1 - h2/n2`` (independent samples), as fractions."""
    p1, p2 = h1 / max(1, n1), h2 / max(1, n2)
    l1, u1 = wilson(h1, n1, z)
    l2, u2 = wilson(h2, n2, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], resamples: int = 10_000, level: float = 0.95, seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of ``b - a`` over paired examples and its percentile bootstrap interval.

    ``a[i]`` and ``b[i]`` are two scores of example ``i`` (e.g. 0/1 ``contains`` of the default and the read-twice
    prompt); the examples are resampled with replacement ``resamples`` times (fixed ``seed``: the same interval
    every time). Returns ``(mean, low, high)`` in the scores' unit.
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same number of examples, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("no paired examples")
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError("resamples must be >= 1 and level in (0, 1)")
    diffs = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    tail = 100 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(diffs.mean()), float(low), float(high)


def bootstrap_ratio(
    num: Sequence[float], den: Sequence[float], resamples: int = 10_000, level: float = 0.95, seed: int = 0,
) -> tuple[float, float, float]:
    """``sum(num) / sum(den)`` over units (e.g. summed loss and token count per text window) and its percentile
    bootstrap interval, resampling units with replacement. Returns ``(ratio, low, high)``."""
    if len(num) != len(den) or not num:
        raise ValueError("num and den need the same, non-zero number of units")
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    ratios = a[idx].sum(axis=1) / b[idx].sum(axis=1)
    tail = 100 * (1.0 - level) / 2.0
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(a.sum() / b.sum()), float(low), float(high)
