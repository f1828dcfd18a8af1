"""Helpers shared by the forward (``_ops.py``) and the backward (``_backward.py``) of the Triton operators:
launch configuration, autotuning, segmentation, the byte mask and the encoder (prefix) state.

The module is private to :mod:`jrt.ops.triton`; its names carry no underscore so that both files import them.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton

from jrt.ops.common import State
from jrt.ops.feature_map import feature_dim
from jrt.ops.triton import _kernels


@dataclass(frozen=True)
class OpSpec:
    """The options of one Triton operator call that its forward hands to its backward.

    ``prefix``: prefix linear attention (else causal linear attention); ``mask``: ``[B, T]`` bool or None;
    ``prefix_lengths``: long ``[B]`` (prefix only, else None); ``output_final_state``, ``eps``, ``num_segments``:
    as the public functions take them.
    """

    prefix: bool
    mask: torch.Tensor | None
    output_final_state: bool
    eps: float
    num_segments: int | None
    prefix_lengths: torch.Tensor | None = None


#: Largest feature dimension the kernels accept (the state block ``[BK*BK, BV]`` lives in registers).
MAX_FEATURE_DIM = 32
#: Environment variable: ``0`` turns the CUDA autotuning of the chunk kernels off (first config is used).
AUTOTUNE_ENV = "JRT_TRITON_AUTOTUNE"
#: Shortest segment of the segmented causal pass (see :func:`linear_attention`).
MIN_SEGMENT = 1024

# (BT, BV, num_warps) tried on CUDA per kernel; the first one is the default without autotuning. They
# were chosen by compiling for sm_90 offline (Triton's ptxas, no GPU at hand): with bfloat16 inputs and
# F = 16 the defaults spill at most 32 bytes per thread. BT is the chunk length, BV the value columns of one
# program.
CUDA_CONFIGS = {
    "causal_fwd_kernel": ((16, 32, 8), (16, 16, 4), (32, 32, 8), (16, 64, 8)),
    "chunk_state_kernel": ((16, 32, 8), (32, 32, 8), (16, 32, 4), (64, 32, 8)),
}
INTERPRET_CONFIG = (16, 32, 4)


def block_k(f: int) -> int:
    if f > MAX_FEATURE_DIM:
        raise ValueError(
            f"the Triton kernels support feature dimensions F <= {MAX_FEATURE_DIM}, got F={f}; use impl='chunk'"
        )
    return max(16, triton.next_power_of_2(f))


def lowp_flags(*tensors: torch.Tensor) -> tuple[bool, bool]:
    """16-bit tensor-core operands when every input is bfloat16/float16 on CUDA (float32 accumulation);
    otherwise float32 operands with ``tf32x3`` products (about float32 accuracy on tensor cores)."""
    dtypes = {t.dtype for t in tensors}
    on_cuda = all(t.is_cuda for t in tensors)
    if on_cuda and dtypes == {torch.bfloat16}:
        return True, True
    if on_cuda and dtypes == {torch.float16}:
        return True, False
    return False, False


def autotune_on() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


@functools.cache
def tuned(name: str):
    """The autotuned (CUDA) version of a chunk kernel: tries ``CUDA_CONFIGS`` once per (F, Dv, dtypes)."""
    configs = [triton.Config({"BT": bt, "BV": bv}, num_warps=w) for bt, bv, w in CUDA_CONFIGS[name]]
    return triton.autotune(configs=configs, key=["F", "DV"])(getattr(_kernels, name))


def autotuned_configs() -> dict[str, str]:
    """The launch configuration the autotuner chose for each kernel (last key tuned), or ``"not tuned"``."""
    chosen = {}
    for name in CUDA_CONFIGS:
        best = getattr(tuned(name), "best_config", None)
        chosen[name] = str(best) if best is not None else "not tuned"
    return chosen


def launch(name: str, grid_of, args: list, constexprs: dict, device: torch.device) -> None:
    """Launch kernel ``name`` with a grid computed from its ``BV``; autotuned on CUDA unless disabled."""
    if device.type == "cuda" and autotune_on():
        tuned(name)[lambda meta: grid_of(meta["BV"])](*args, **constexprs)
        return
    bt, bv, warps = CUDA_CONFIGS[name][0] if device.type == "cuda" else INTERPRET_CONFIG
    kernel = getattr(_kernels, name)
    extra = {"num_warps": warps} if device.type == "cuda" else {}
    kernel[grid_of(bv)](*args, BT=bt, BV=bv, **constexprs, **extra)


def segment_count(batch_heads: int, dv: int, length: int, device: torch.device, requested: int | None) -> int:
    """Segments of a pass over the sequence. On CUDA: one when the ``(batch, head, value block)`` programs
    already fill the GPU twice over (a program of the chunk kernels holds most of a multiprocessor's
    registers), else enough segments for that, each at least ``MIN_SEGMENT`` tokens. Segments cost one extra
    pass for their starting states, so they pay off only for small batches."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"num_segments must be >= 1, got {requested}")
        return min(requested, length)
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch_heads * triton.cdiv(dv, 32)
    wanted = math.ceil(2 * sms / programs)
    return max(1, min(wanted, length // MIN_SEGMENT))


def segment_length(length: int, segments: int, multiple: int = 64) -> int:
    """Length of each segment, a multiple of every chunk length ``BT`` in ``CUDA_CONFIGS`` (so chunks never
    straddle segments)."""
    return triton.cdiv(triton.cdiv(length, segments), multiple) * multiple


def keep_bytes(keep: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if keep is None else keep.to(device=device, dtype=torch.int8).contiguous()


def chunk_states(
    k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, segments: int,
    end: torch.Tensor | None = None,
) -> State:
    """Per-segment sums ``(S [n, B, H, D, Dv], z [n, B, H, D])`` of ``phi(k_j) [v_j, 1]^T`` over the kept
    positions (and those before ``end[b]``) of each of ``segments`` equal segments."""
    b, t, h, f = k.shape
    dv = v.shape[-1]
    d = feature_dim(f)
    seg_len = segment_length(t, segments)
    n = triton.cdiv(t, seg_len)
    s_out = torch.empty(n, b, h, d, dv, device=k.device, dtype=torch.float32)
    z_out = torch.empty(n, b, h, d, device=k.device, dtype=torch.float32)
    keep8 = keep_bytes(keep, k.device)
    end32 = None if end is None else end.to(device=k.device, dtype=torch.int32).contiguous()
    lowp, lowp_bf16 = lowp_flags(k, v)
    args = [
        k, v, keep8 if keep8 is not None else s_out, end32 if end32 is not None else s_out, s_out, z_out,
        *k.stride(), *v.stride(),
        t, h, f, dv, seg_len, b * h * d * dv, b * h * d,
        f**-0.25,
    ]
    constexprs = dict(
        BK=block_k(f), HAS_KEEP=keep8 is not None, HAS_END=end32 is not None, LOWP=lowp, LOWP_BF16=lowp_bf16,
    )
    launch("chunk_state_kernel", lambda bv: (triton.cdiv(dv, bv), b * h, n), args, constexprs, k.device)
    return s_out, z_out


def encoder_state(
    k_enc: torch.Tensor, v_enc: torch.Tensor, in_prefix: torch.Tensor, num_segments: int | None
) -> State:
    """``(S_enc [B, H, D, Dv], z_enc [B, H, D])`` float32 over the prefix positions ``in_prefix [B, T]``."""
    b, t, h, _ = k_enc.shape
    positions = torch.arange(1, t + 1, device=k_enc.device)
    end = (in_prefix.long() * positions).amax(-1)  # one past the last prefix position (0: empty prefix)
    longest = int(end.max()) if b else 0
    if longest == 0:
        d, dv = feature_dim(k_enc.shape[-1]), v_enc.shape[-1]
        return (
            torch.zeros(b, h, d, dv, device=k_enc.device, dtype=torch.float32),
            torch.zeros(b, h, d, device=k_enc.device, dtype=torch.float32),
        )
    segments = segment_count(b * h, v_enc.shape[-1], longest, k_enc.device, num_segments)
    # segments of the longest prefix; positions past each sequence's own end are skipped in the kernel
    s_parts, z_parts = chunk_states(k_enc[:, :longest], v_enc[:, :longest], in_prefix[:, :longest], segments, end)
    return s_parts.sum(0), z_parts.sum(0)
