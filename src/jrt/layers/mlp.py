"""Channel mixing: the SwiGLU MLP of JRT-RNN / Based blocks, and RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Root-mean-square norm ``x * rsqrt(mean(x^2) + eps) * weight`` (no bias), as in the published models.
RMSNorm = nn.RMSNorm


class SwiGLU(nn.Module):
    """Gated MLP ``fc2(silu(g) * y)`` with ``[y, g] = fc1(x)``, no biases.

    The row order of ``fc1`` follows the published checkpoints: rows ``[:intermediate]`` are the value ``y``
    and rows ``[intermediate:]`` are the gate ``g`` (value first, then gate).

    Args:
        hidden_size: model width d.
        intermediate_size: hidden width of the MLP (2 * d in the published models).
        bias: add biases to ``fc1`` and ``fc2``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int | None = None, bias: bool = False) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        intermediate_size = intermediate_size or 2 * hidden_size
        if intermediate_size < 1:
            raise ValueError(f"intermediate_size must be >= 1, got {intermediate_size}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.fc1 = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.fc2 = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d] -> [..., d]``."""
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * y)
