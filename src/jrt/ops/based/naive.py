"""The plain quadratic forms: the specification of both operators, and the oracle every other form is tested
against. Explicit full feature map ``phi`` (``D = 1+F+F^2``); see :mod:`jrt.ops.based` for the layout.

``linear_attention``::

    o_i = phi(q_i) . S_i / (phi(q_i) . z_i + eps)
    S_i = S_0 + sum_{j<=i} phi(k_j) v_j^T,   z_i = z_0 + sum_{j<=i} phi(k_j)

``prefix_linear_attention`` adds, at every position, the non-causal encoder sum over the first ``M_b`` real
tokens of sequence ``b``::

    o_i = phi(q_i) . (S_i + S_enc) / (phi(q_i) . (z_i + z_enc) + eps)
    S_enc = sum_{j<M_b} phi(ke_j) ve_j^T,   z_enc = sum_{j<M_b} phi(ke_j)
"""

from __future__ import annotations

import torch

from jrt.ops.feature_map import taylor_feature_map


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v1: torch.Tensor,
    state0: torch.Tensor | None = None,
    encoder: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal scores ``tril(phi(q) phi(k)^T)`` (plus the encoder scores ``phi(q) phi(k_enc)^T``, every query
    against every prefix key) times ``[v, 1]``, plus the initial state read by ``phi(q)``.

    Returns ``(o1 [B, H, T, Dv+1], state [B, H, D, Dv+1])``.
    """
    phi_q, phi_k = taylor_feature_map(q), taylor_feature_map(k)
    t = q.shape[-2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~causal, 0.0)
    o1 = scores @ v1
    state = phi_k.transpose(-1, -2) @ v1
    if encoder is not None:
        phi_e = taylor_feature_map(encoder[0])
        o1 = o1 + (phi_q @ phi_e.transpose(-1, -2)) @ encoder[1]
        state = state + phi_e.transpose(-1, -2) @ encoder[1]
    if state0 is not None:
        o1 = o1 + phi_q @ state0
        state = state + state0
    return o1, state
