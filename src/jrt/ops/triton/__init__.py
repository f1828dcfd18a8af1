"""Triton GPU kernels for Based linear attention and JRT-RNN's prefix linear attention.

Importing this package raises ``ImportError`` when Triton is not installed (``jrt.ops.based.api``
probes it to decide whether ``impl="auto"`` may take these kernels on CUDA tensors).

* :func:`linear_attention` / :func:`prefix_linear_attention` - the forward passes behind ``impl="triton"``
  (chunked causal pass with the Taylor map fused, float32 accumulation, initial/final state, denominator,
  padding masks, per-sequence prefix lengths; the sequence is split into segments processed in parallel on
  a GPU). **Backward**: when an input requires grad, the forward runs inside an ``autograd.Function`` whose
  backward runs the Triton backward kernels (``_backward.py``: a forward sweep for ``dq``, a reverse sweep for
  ``dk, dv`` and the initial/encoder state); ``JRT_TRITON_BACKWARD=recompute`` instead recomputes the op
  through the chunked PyTorch form (``impl="chunk"``, :mod:`jrt.ops.based.layout`) and differentiates that.

Decoding steps (``T = 1`` per call) run through the same causal kernel, with the state handed in and out.

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
set before this package is first imported; slow, for tests). On CUDA, the chunk kernels are autotuned over
a few launch configurations (``JRT_TRITON_AUTOTUNE=0`` turns that off); bfloat16/float16 inputs use 16-bit
tensor-core operands with float32 accumulation, float32 inputs exact float32 products, float64 inputs are
computed in float32.
"""

from __future__ import annotations

import triton  # noqa: F401  (ImportError here when Triton is absent)

from jrt.ops.triton._common import AUTOTUNE_ENV, CUDA_CONFIGS, MAX_FEATURE_DIM, autotuned_configs
from jrt.ops.triton._ops import linear_attention, prefix_linear_attention

__all__ = [
    "AUTOTUNE_ENV",
    "CUDA_CONFIGS",
    "MAX_FEATURE_DIM",
    "autotuned_configs",
    "linear_attention",
    "prefix_linear_attention",
]
