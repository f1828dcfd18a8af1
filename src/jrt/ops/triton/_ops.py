"""Python entry points of the Triton kernels: launch configuration, segmentation, masks, autograd."""

from __future__ import annotations

import functools
import math
import os

import torch
import triton

from jrt.ops.based.layout import chunked, pytorch_form
from jrt.ops.common import State, prefix_positions
from jrt.ops.feature_map import feature_dim
from jrt.ops.triton import _kernels

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
_INTERPRET_CONFIG = (16, 32, 4)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_device(*tensors: torch.Tensor | None) -> None:
    devices = {t.device.type for t in tensors if t is not None}
    if devices - {"cuda"}:
        if not _interpreting() or not isinstance(_kernels.causal_fwd_kernel, _interpreted_type()):
            raise ValueError(
                "the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1, set before jrt.ops.triton is "
                f"first imported, to run on CPU tensors); got tensors on {sorted(devices)}"
            )


@functools.lru_cache(maxsize=1)
def _interpreted_type() -> type:
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction


def _block_k(f: int) -> int:
    if f > MAX_FEATURE_DIM:
        raise ValueError(
            f"the Triton kernels support feature dimensions F <= {MAX_FEATURE_DIM}, got F={f}; use impl='chunk'"
        )
    return max(16, triton.next_power_of_2(f))


def _lowp(*tensors: torch.Tensor) -> tuple[bool, bool]:
    """16-bit tensor-core operands when every input is bfloat16/float16 on CUDA (float32 accumulation);
    otherwise float32 operands with ``tf32x3`` products (about float32 accuracy on tensor cores)."""
    dtypes = {t.dtype for t in tensors}
    on_cuda = all(t.is_cuda for t in tensors)
    if on_cuda and dtypes == {torch.bfloat16}:
        return True, True
    if on_cuda and dtypes == {torch.float16}:
        return True, False
    return False, False


def _autotune_on() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


@functools.cache
def _tuned(name: str):
    """The autotuned (CUDA) version of a chunk kernel: tries ``CUDA_CONFIGS`` once per (F, Dv, dtypes)."""
    configs = [triton.Config({"BT": bt, "BV": bv}, num_warps=w) for bt, bv, w in CUDA_CONFIGS[name]]
    return triton.autotune(configs=configs, key=["F", "DV"])(getattr(_kernels, name))


def autotuned_configs() -> dict[str, str]:
    """The launch configuration the autotuner chose for each kernel (last key tuned), or ``"not tuned"``."""
    chosen = {}
    for name in CUDA_CONFIGS:
        best = getattr(_tuned(name), "best_config", None)
        chosen[name] = str(best) if best is not None else "not tuned"
    return chosen


def _launch(name: str, grid_of, args: list, constexprs: dict, device: torch.device) -> None:
    """Launch kernel ``name`` with a grid computed from its ``BV``; autotuned on CUDA unless disabled."""
    if device.type == "cuda" and _autotune_on():
        _tuned(name)[lambda meta: grid_of(meta["BV"])](*args, **constexprs)
        return
    bt, bv, warps = CUDA_CONFIGS[name][0] if device.type == "cuda" else _INTERPRET_CONFIG
    kernel = getattr(_kernels, name)
    extra = {"num_warps": warps} if device.type == "cuda" else {}
    kernel[grid_of(bv)](*args, BT=bt, BV=bv, **constexprs, **extra)


def _num_segments(batch_heads: int, dv: int, length: int, device: torch.device, requested: int | None) -> int:
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


def _segment_length(length: int, segments: int, multiple: int = 64) -> int:
    """Length of each segment, a multiple of every chunk length ``BT`` in ``CUDA_CONFIGS`` (so chunks never
    straddle segments)."""
    return triton.cdiv(triton.cdiv(length, segments), multiple) * multiple


def _keep_bytes(keep: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if keep is None else keep.to(device=device, dtype=torch.int8).contiguous()


def _chunk_states(
    k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, segments: int,
    end: torch.Tensor | None = None,
) -> State:
    """Per-segment sums ``(S [n, B, H, D, Dv], z [n, B, H, D])`` of ``phi(k_j) [v_j, 1]^T`` over the kept
    positions (and those before ``end[b]``) of each of ``segments`` equal segments."""
    b, t, h, f = k.shape
    dv = v.shape[-1]
    d = feature_dim(f)
    seg_len = _segment_length(t, segments)
    n = triton.cdiv(t, seg_len)
    s_out = torch.empty(n, b, h, d, dv, device=k.device, dtype=torch.float32)
    z_out = torch.empty(n, b, h, d, device=k.device, dtype=torch.float32)
    keep8 = _keep_bytes(keep, k.device)
    end32 = None if end is None else end.to(device=k.device, dtype=torch.int32).contiguous()
    lowp, lowp_bf16 = _lowp(k, v)
    args = [
        k, v, keep8 if keep8 is not None else s_out, end32 if end32 is not None else s_out, s_out, z_out,
        *k.stride(), *v.stride(),
        t, h, f, dv, seg_len, b * h * d * dv, b * h * d,
        f**-0.25,
    ]
    constexprs = dict(
        BK=_block_k(f), HAS_KEEP=keep8 is not None, HAS_END=end32 is not None, LOWP=lowp, LOWP_BF16=lowp_bf16,
    )
    _launch("chunk_state_kernel", lambda bv: (triton.cdiv(dv, bv), b * h, n), args, constexprs, k.device)
    return s_out, z_out


def _causal_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, init: State | None,
    output_final_state: bool, eps: float, num_segments: int | None,
) -> tuple[torch.Tensor, State | None]:
    """The causal pass from ``init`` (float32 ``(S, z)`` or None); float32/bfloat16/float16 inputs."""
    b, t, h, f = q.shape
    dv = v.shape[-1]
    d = feature_dim(f)
    segments = _num_segments(b * h, dv, t, q.device, num_segments)
    if triton.cdiv(t, _segment_length(t, segments)) == 1:
        segments = 1
    if init is not None:
        init = (init[0].to(torch.float32), init[1].to(torch.float32))
    final: State | None = None
    if segments > 1:
        # segmented: per-segment states in parallel, exclusive prefix sum, then all segments at once
        parts_s, parts_z = _chunk_states(k, v, keep, segments)
        seg_len = _segment_length(t, segments)
        run_s, run_z = parts_s.cumsum(0), parts_z.cumsum(0)
        start_s = torch.cat([torch.zeros_like(run_s[:1]), run_s[:-1]])
        start_z = torch.cat([torch.zeros_like(run_z[:1]), run_z[:-1]])
        if init is not None:
            start_s, start_z = start_s + init[0], start_z + init[1]
            final = (run_s[-1] + init[0], run_z[-1] + init[1]) if output_final_state else None
        elif output_final_state:
            final = (run_s[-1], run_z[-1])
        init = (start_s.contiguous(), start_z.contiguous())
        store_final = False
    else:
        seg_len = t
        store_final = output_final_state
        if init is not None:
            init = (init[0].contiguous(), init[1].contiguous())
    n = triton.cdiv(t, seg_len)
    o = torch.empty(b, t, h, dv, device=q.device, dtype=v.dtype)
    if store_final:
        final = (
            torch.empty(b, h, d, dv, device=q.device, dtype=torch.float32),
            torch.empty(b, h, d, device=q.device, dtype=torch.float32),
        )
    keep8 = _keep_bytes(keep, q.device)
    dummy = o
    lowp, lowp_bf16 = _lowp(q, k, v)
    args = [
        q, k, v, o, keep8 if keep8 is not None else dummy,
        init[0] if init is not None else dummy, init[1] if init is not None else dummy,
        final[0] if store_final else dummy, final[1] if store_final else dummy,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        t, h, f, dv, seg_len, b * h * d * dv, b * h * d,
        f**-0.25, float(eps),
    ]
    constexprs = dict(
        BK=_block_k(f), HAS_KEEP=keep8 is not None, HAS_INIT=init is not None, STORE_FINAL=store_final,
        LOWP=lowp, LOWP_BF16=lowp_bf16,
    )
    _launch("causal_fwd_kernel", lambda bv: (triton.cdiv(dv, bv), b * h, n), args, constexprs, q.device)
    return o, final


def _as_kernel_input(x: torch.Tensor) -> torch.Tensor:
    """float64 inputs run in float32 (the kernels accumulate in float32); other dtypes as they are."""
    return x.float() if x.dtype == torch.float64 else x


def _encoder_state(
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
    segments = _num_segments(b * h, v_enc.shape[-1], longest, k_enc.device, num_segments)
    # segments of the longest prefix; positions past each sequence's own end are skipped in the kernel
    s_parts, z_parts = _chunk_states(k_enc[:, :longest], v_enc[:, :longest], in_prefix[:, :longest], segments, end)
    return s_parts.sum(0), z_parts.sum(0)


#: The chunked PyTorch form on the public layout: the backward pass of the kernels recomputes through it.
_CHUNK_FORM = pytorch_form(chunked)


class _RecomputeBackward(torch.autograd.Function):
    """Triton forward; backward with the Triton backward kernels (``_backward.py``) when they apply (F <= 32,
    ``$JRT_TRITON_BACKWARD`` not ``recompute``), else by recomputing through the chunked PyTorch form."""

    @staticmethod
    def forward(ctx, spec: dict, q, k, v, k_enc, v_enc, s0, z0):  # type: ignore[override]
        ctx.spec = spec
        init = None if s0 is None else (s0, z0)
        if spec["prefix"]:
            o, state = _prefix_forward(q, k, v, k_enc, v_enc, spec["prefix_lengths"], spec["mask"], init,
                                       spec["output_final_state"], spec["eps"], spec["num_segments"])
        else:
            o, state = _linear_forward(q, k, v, spec["mask"], init, spec["output_final_state"], spec["eps"],
                                       spec["num_segments"])
        ctx.save_for_backward(q, k, v, k_enc, v_enc, s0, z0, o)
        if state is None:
            return o
        return o, state[0], state[1]

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        from jrt.ops.triton import _backward

        spec = ctx.spec
        needs = ctx.needs_input_grad[1:]
        if _backward.uses_kernels(ctx.saved_tensors[0].shape[-1]):  # the Triton backward kernels
            return (None, *_backward.backward(spec, ctx.saved_tensors, grads, needs))
        saved = ctx.saved_tensors[:7]  # fallback: recompute through impl="chunk" and differentiate that
        with torch.enable_grad():
            inputs = [
                None if x is None else (x.detach().requires_grad_(True) if need else x.detach())
                for x, need in zip(saved, needs)
            ]
            q, k, v, k_enc, v_enc, s0, z0 = inputs
            init = None if s0 is None else (s0, z0)
            encoder = (k_enc, v_enc, spec["prefix_lengths"]) if spec["prefix"] else None
            o, state = _CHUNK_FORM(q, k, v, spec["mask"], init, encoder, spec["eps"], spec["output_final_state"])
            outputs = [o] if state is None else [o, state[0], state[1]]
            pairs = [(out, g) for out, g in zip(outputs, grads) if g is not None]
            wanted = [x for x, need in zip(inputs, needs) if need and x is not None]
            found = torch.autograd.grad(
                [p[0] for p in pairs], wanted, [p[1] for p in pairs], allow_unused=True
            ) if pairs and wanted else []
        found_iter = iter(found)
        result = [next(found_iter) if need and x is not None else None for x, need in zip(inputs, needs)]
        return (None, *result)


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _linear_forward(q, k, v, mask, init, output_final_state, eps, num_segments):
    q, k, v = (_as_kernel_input(x) for x in (q, k, v))
    return _causal_forward(q, k, v, mask, init, output_final_state, eps, num_segments)


def _prefix_forward(
    q, k, v, k_enc, v_enc, prefix_lengths, mask, init, output_final_state, eps, num_segments
):
    q, k, v, k_enc, v_enc = (_as_kernel_input(x) for x in (q, k, v, k_enc, v_enc))
    in_prefix = prefix_positions(prefix_lengths, q.shape[1], mask)
    enc_s, enc_z = _encoder_state(k_enc, v_enc, in_prefix, num_segments)
    if init is not None:
        enc_s, enc_z = enc_s + init[0].float(), enc_z + init[1].float()
    return _causal_forward(q, k, v, mask, (enc_s, enc_z), output_final_state, eps, num_segments)


def _finish(result, v: torch.Tensor, output_final_state: bool) -> tuple[torch.Tensor, State | None]:
    if isinstance(result, tuple):
        o, s, z = result
        return o.to(v.dtype), (s, z)
    return result.to(v.dtype), None


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    initial_state: State | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    attention_mask: torch.Tensor | None = None,
    num_segments: int | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Causal, normalised Based linear attention (Taylor map fused) with the Triton kernels.

    Same contract as :func:`jrt.ops.linear_attention` (which validates the inputs before calling this):

    Args:
        q, k: ``[B, T, H, F]`` raw projections (``F <= 32``); ``v``: ``[B, T, H, Dv]``. Any strides.
        initial_state: ``(S [B, H, D, Dv], z [B, H, D])`` with ``D = 1+F+F^2``, or None.
        output_final_state: also return the state after the last position.
        eps: added to the denominator.
        attention_mask: bool ``[B, T]`` (True = token) or None; padded positions enter no sum.
        num_segments: split the sequence into this many segments processed in parallel (their starting
            states come from a first pass of per-segment state sums and a prefix sum). Default: 1 on CPU
            (interpreter); on CUDA one, or more when batch * heads is too small to fill the GPU.

    Returns:
        ``(o [B, T, H, Dv] in v's dtype, (S, z) float32 or None)``. float64 inputs are computed in float32.
        With ``requires_grad`` inputs, the backward runs the Triton backward kernels (``_backward.py``).
    """
    _check_device(q, k, v)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=q.device, dtype=torch.bool)
    init = None if initial_state is None else (initial_state[0].float(), initial_state[1].float())
    spec = dict(prefix=False, mask=attention_mask, output_final_state=output_final_state, eps=eps,
                num_segments=num_segments)
    if _needs_autograd(q, k, v, *(initial_state or ())):
        s0, z0 = initial_state if initial_state is not None else (None, None)
        return _finish(_RecomputeBackward.apply(spec, q, k, v, None, None, s0, z0), v, output_final_state)
    o, state = _linear_forward(q, k, v, attention_mask, init, output_final_state, eps, num_segments)
    return o.to(v.dtype), state


def prefix_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_enc: torch.Tensor,
    v_enc: torch.Tensor,
    prefix_lengths: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    num_segments: int | None = None,
) -> tuple[torch.Tensor, State | None]:
    """JRT-RNN's prefix linear attention with the Triton kernels: the encoder state of each sequence's first
    ``prefix_lengths[b]`` real tokens (one reduction kernel, split over segments), then the causal pass
    started from ``initial_state + encoder state``.

    Args:
        q, k: ``[B, T, H, F]``; v: ``[B, T, H, Dv]``; k_enc, v_enc: encoder projections of the same shapes.
        prefix_lengths: long ``[B]``, validated (``0 <= M_b <=`` real tokens).
        attention_mask, initial_state, output_final_state, eps, num_segments: as in
            :func:`linear_attention`.

    Returns:
        ``(o [B, T, H, Dv] in v's dtype, (S_T + S_enc, z_T + z_enc) float32 or None)``.
    """
    _check_device(q, k, v, k_enc, v_enc)
    prefix_lengths = torch.as_tensor(prefix_lengths, dtype=torch.long, device=q.device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=q.device, dtype=torch.bool)
    init = None if initial_state is None else (initial_state[0].float(), initial_state[1].float())
    spec = dict(prefix=True, mask=attention_mask, prefix_lengths=prefix_lengths,
                output_final_state=output_final_state, eps=eps, num_segments=num_segments)
    if _needs_autograd(q, k, v, k_enc, v_enc, *(initial_state or ())):
        s0, z0 = initial_state if initial_state is not None else (None, None)
        return _finish(_RecomputeBackward.apply(spec, q, k, v, k_enc, v_enc, s0, z0), v, output_final_state)
    o, state = _prefix_forward(q, k, v, k_enc, v_enc, prefix_lengths, attention_mask, init, output_final_state,
                               eps, num_segments)
    return o.to(v.dtype), state
