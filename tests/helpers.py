"""Shared test helpers."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ``||x - ref|| / ||ref||`` in float64 (the measure every fast path is checked by)."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def interpreting(kernels: ModuleType, probe: str, *dependents: ModuleType) -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``, set by conftest without a
    GPU). If ``kernels`` was imported earlier in this process without the interpreter (its kernel ``probe`` is
    compiled, not interpreted), it is reloaded, then ``dependents``, so that its kernels are decorated again."""
    on = os.environ.get("TRITON_INTERPRET") == "1"
    if on and type(getattr(kernels, probe)).__name__ != "InterpretedFunction":
        for module in (kernels, *dependents):
            importlib.reload(module)
    return on
