"""Pure tensor operators: the numerical core of JRT-Prompt and JRT-RNN.

Shapes follow flash-linear-attention: ``q, k: [B, T, H, F]``, ``v: [B, T, H, Dv]``; states
``(S [B, H, D, Dv], z [B, H, D])`` in float32 with ``D = 1+F+F^2``.

Layout (each module imports only from those above it in this list):

* :mod:`jrt.ops.common` - input checks and mask helpers shared by every form, the kernels and the layers;
* :mod:`jrt.ops.feature_map` - the Taylor feature map, full and compressed, and the state conversions;
* :mod:`jrt.ops.triton` - the GPU kernels of the linear-attention family (optional: needs Triton);
* :mod:`jrt.ops.based` - Based linear attention and prefix linear attention: ``naive`` (the reference),
  ``chunk``, ``chunk_inference``, ``native`` (C++ CPU kernels), ``recurrent`` and ``api`` (checks and the one
  dispatch table);
* :mod:`jrt.ops.sliding_window` - sliding-window softmax attention with rotary embedding and its decode step.
"""

from jrt.ops.based.api import IMPL_ENV, linear_attention, prefix_linear_attention, resolve_impl
from jrt.ops.common import prefix_positions
from jrt.ops.feature_map import compress_state, expand_state, feature_dim, taylor_feature_map, taylor_kernel
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
