"""Pure tensor operators: the numerical core of JRT-Prompt and JRT-RNN.

Shapes follow flash-linear-attention: ``q, k: [B, T, H, F]``, ``v: [B, T, H, Dv]``; states
``(S [B, H, D, Dv], z [B, H, D])`` in float32 with ``D = 1+F+F^2``.
"""

from jrt.ops.feature_map import compress_state, expand_state, feature_dim, taylor_feature_map, taylor_kernel
from jrt.ops.linear_attention import (
    IMPL_ENV,
    linear_attention,
    prefix_linear_attention,
    prefix_positions,
    resolve_impl,
)
from jrt.ops.sliding_window import (
    RingBuffer,
    apply_rotary,
    positions_from_mask,
    sliding_window_attention,
    sliding_window_decode_step,
)

__all__ = [
    "IMPL_ENV",
    "RingBuffer",
    "apply_rotary",
    "compress_state",
    "expand_state",
    "feature_dim",
    "linear_attention",
    "positions_from_mask",
    "prefix_linear_attention",
    "prefix_positions",
    "resolve_impl",
    "sliding_window_attention",
    "sliding_window_decode_step",
    "taylor_feature_map",
    "taylor_kernel",
]
