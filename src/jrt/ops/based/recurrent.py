"""The token loop: one state update and one read per position, the decoding form (``T = 1`` per call when
generating). Full feature map; see :mod:`jrt.ops.based` for the layout."""

from __future__ import annotations

import torch

from jrt.ops.feature_map import feature_dim, taylor_feature_map


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v1: torch.Tensor,
    state0: torch.Tensor | None = None,
    encoder: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``state += phi(k_i) [v_i, 1]^T; o1_i = phi(q_i) . state`` for ``i = 0..T-1``, starting from ``state0``
    plus the encoder state ``phi(k_enc)^T [v_enc, 1]``. Returns ``(o1 [B, H, T, Dv+1], state [B, H, D, Dv+1])``."""
    b, h, t, f = q.shape
    state = state0.clone() if state0 is not None else q.new_zeros(b, h, feature_dim(f), v1.shape[-1])
    if encoder is not None:
        state = state + taylor_feature_map(encoder[0]).transpose(-1, -2) @ encoder[1]
    phi_q, phi_k = taylor_feature_map(q), taylor_feature_map(k)
    outputs = []
    for i in range(t):
        state = state + phi_k[:, :, i, :, None] * v1[:, :, i, None, :]
        outputs.append((phi_q[:, :, i, None, :] @ state).squeeze(-2))
    return torch.stack(outputs, dim=2), state
