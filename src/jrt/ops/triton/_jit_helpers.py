"""Triton jit helpers shared by the forward kernels (``_kernels.py``) and the backward kernels
(``_backward_kernels.py``): the one matrix product of both."""

from __future__ import annotations

import triton
import triton.language as tl

INV_SQRT2 = tl.constexpr(0.7071067811865476)


@triton.jit
def dot(a, b, LOWP: tl.constexpr, LOWP_BF16: tl.constexpr):
    """``a @ b`` with float32 accumulation: 16-bit operands on tensor cores (``LOWP``), else float32 operands
    with the three-pass TF32 product (``tf32x3``: about float32 accuracy, on tensor cores; plain float32
    FMAs spilled heavily when compiled for sm_90)."""
    if LOWP:
        if LOWP_BF16:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:
            return tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        return tl.dot(a, b, input_precision="tf32x3")
