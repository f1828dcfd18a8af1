"""Shared test helpers."""

from __future__ import annotations

import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ``||x - ref|| / ||ref||`` in float64 (the measure every fast path is checked by)."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()
