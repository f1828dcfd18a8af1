"""Python entry points of the Triton kernels: launch configuration, segmentation, masks, autograd."""

from __future__ import annotations

import functools
import os

import torch
import triton

from jrt.ops.based.layout import chunked, pytorch_form
from jrt.ops.common import State, prefix_positions
from jrt.ops.feature_map import feature_dim
from jrt.ops.triton import _backward, _kernels
from jrt.ops.triton._common import (
    OpSpec,
    block_k,
    chunk_states,
    encoder_state,
    keep_bytes,
    launch,
    lowp_flags,
    segment_count,
    segment_length,
)


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


def _causal_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, init: State | None,
    output_final_state: bool, eps: float, num_segments: int | None,
) -> tuple[torch.Tensor, State | None]:
    """The causal pass from ``init`` (float32 ``(S, z)`` or None); float32/bfloat16/float16 inputs."""
    b, t, h, f = q.shape
    dv = v.shape[-1]
    d = feature_dim(f)
    segments = segment_count(b * h, dv, t, q.device, num_segments)
    if triton.cdiv(t, segment_length(t, segments)) == 1:
        segments = 1
    if init is not None:
        init = (init[0].to(torch.float32), init[1].to(torch.float32))
    final: State | None = None
    if segments > 1:
        # segmented: per-segment states in parallel, exclusive prefix sum, then all segments at once
        parts_s, parts_z = chunk_states(k, v, keep, segments)
        seg_len = segment_length(t, segments)
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
    keep8 = keep_bytes(keep, q.device)
    dummy = o
    lowp, lowp_bf16 = lowp_flags(q, k, v)
    args = [
        q, k, v, o, keep8 if keep8 is not None else dummy,
        init[0] if init is not None else dummy, init[1] if init is not None else dummy,
        final[0] if store_final else dummy, final[1] if store_final else dummy,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        t, h, f, dv, seg_len, b * h * d * dv, b * h * d,
        f**-0.25, float(eps),
    ]
    constexprs = dict(
        BK=block_k(f), HAS_KEEP=keep8 is not None, HAS_INIT=init is not None, STORE_FINAL=store_final,
        LOWP=lowp, LOWP_BF16=lowp_bf16,
    )
    launch("causal_fwd_kernel", lambda bv: (triton.cdiv(dv, bv), b * h, n), args, constexprs, q.device)
    return o, final


def _as_kernel_input(x: torch.Tensor) -> torch.Tensor:
    """float64 inputs run in float32 (the kernels accumulate in float32); other dtypes as they are."""
    return x.float() if x.dtype == torch.float64 else x


#: The chunked PyTorch form on the public layout: the backward pass of the kernels recomputes through it.
_CHUNK_FORM = pytorch_form(chunked)


class _TritonAutograd(torch.autograd.Function):
    """Triton forward; backward with the Triton backward kernels (``_backward.py``) when they apply (F <= 32,
    ``$JRT_TRITON_BACKWARD`` not ``recompute``), else by recomputing through the chunked PyTorch form."""

    @staticmethod
    def forward(ctx, spec: OpSpec, q, k, v, k_enc, v_enc, s0, z0):  # type: ignore[override]
        ctx.spec = spec
        init = None if s0 is None else (s0, z0)
        if spec.prefix:
            o, state = _prefix_forward(q, k, v, k_enc, v_enc, spec.prefix_lengths, spec.mask, init,
                                       spec.output_final_state, spec.eps, spec.num_segments)
        else:
            o, state = _linear_forward(q, k, v, spec.mask, init, spec.output_final_state, spec.eps,
                                       spec.num_segments)
        ctx.save_for_backward(q, k, v, k_enc, v_enc, s0, z0, o)
        if state is None:
            return o
        return o, state[0], state[1]

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
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
            encoder = (k_enc, v_enc, spec.prefix_lengths) if spec.prefix else None
            o, state = _CHUNK_FORM(q, k, v, spec.mask, init, encoder, spec.eps, spec.output_final_state)
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
    enc_s, enc_z = encoder_state(k_enc, v_enc, in_prefix, num_segments)
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
    spec = OpSpec(prefix=False, mask=attention_mask, output_final_state=output_final_state, eps=eps,
                  num_segments=num_segments)
    if _needs_autograd(q, k, v, *(initial_state or ())):
        s0, z0 = initial_state if initial_state is not None else (None, None)
        return _finish(_TritonAutograd.apply(spec, q, k, v, None, None, s0, z0), v, output_final_state)
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
    spec = OpSpec(prefix=True, mask=attention_mask, prefix_lengths=prefix_lengths,
                  output_final_state=output_final_state, eps=eps, num_segments=num_segments)
    if _needs_autograd(q, k, v, k_enc, v_enc, *(initial_state or ())):
        s0, z0 = initial_state if initial_state is not None else (None, None)
        return _finish(_TritonAutograd.apply(spec, q, k, v, k_enc, v_enc, s0, z0), v, output_final_state)
    o, state = _prefix_forward(q, k, v, k_enc, v_enc, prefix_lengths, attention_mask, init, output_final_state,
                               eps, num_segments)
    return o.to(v.dtype), state
