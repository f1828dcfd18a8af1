"""Input validation shared by the layers."""

from __future__ import annotations

import torch


def check_hidden(x: object, hidden_size: int) -> None:
    """``x`` must be a tensor ``[B, T, hidden_size]`` with ``T >= 1``."""
    if not torch.is_tensor(x) or x.dim() != 3 or x.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden_states must be a tensor [B, T, {hidden_size}], got {tuple(getattr(x, 'shape', ()))}"
        )
    if x.shape[1] < 1:
        raise ValueError("hidden_states must hold at least one position (T >= 1)")
