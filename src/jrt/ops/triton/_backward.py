"""Backward pass of the Triton operators (``jrt.ops.triton``): launchers of the kernels in
:mod:`jrt.ops.triton._backward_kernels`.

:func:`backward` returns the gradients of ``q, k, v, k_enc, v_enc, S_0, z_0`` from those of the outputs
``o`` and, when the forward returned it, the final state ``(S_T, z_T)``:

1. ``delta_i = dO_i . o_i`` (PyTorch, from the saved output);
2. :func:`~jrt.ops.triton._backward_kernels.bwd_dq_kernel`: a forward sweep over the chunks that rebuilds the
   denominators and the running state and writes ``dq``;
3. :func:`~jrt.ops.triton._backward_kernels.bwd_dkv_kernel`: a reverse sweep with the running state gradient
   that writes ``dk``, ``dv`` and the gradient of the initial state;
4. for ``prefix_linear_attention`` the initial state of the causal pass includes the encoder state, whose
   gradient is that of the initial state: :func:`~jrt.ops.triton._backward_kernels.bwd_state_kv_kernel`
   turns it into ``dk_enc``, ``dv_enc`` over each sequence's prefix.

One program per (batch, head, block of value columns) sweeps the whole sequence (no segments as in the
forward); ``dq``/``dk`` are summed over the value blocks in PyTorch. Gradients come back in each input's
dtype (float32 accumulation).

``$JRT_TRITON_BACKWARD=recompute`` switches these kernels off: the backward then recomputes the operator
through the chunked PyTorch form and differentiates that (``_TritonAutograd`` in ``_ops.py``).
"""

from __future__ import annotations

import os

import torch
import triton

from jrt.ops.common import prefix_positions
from jrt.ops.feature_map import feature_dim
from jrt.ops.triton import _backward_kernels as kernels
from jrt.ops.triton._common import MAX_FEATURE_DIM, OpSpec, block_k, encoder_state, keep_bytes, lowp_flags

#: Environment variable: ``kernel`` (default) runs the Triton backward kernels, ``recompute`` the fallback.
BACKWARD_ENV = "JRT_TRITON_BACKWARD"
BACKWARD_MODES = ("kernel", "recompute")
#: (BT, BV, num_warps) on CUDA, by padded feature dimension BK; the interpreter takes (16, 32).
_CUDA_CONFIG = {16: (16, 32, 8), 32: (16, 16, 8)}
_INTERPRET_CONFIG = (16, 32)


def uses_kernels(feature: int) -> bool:
    """Whether the backward of an operator with feature dimension ``feature`` runs these kernels (``F <= 32``
    and ``$JRT_TRITON_BACKWARD`` not ``recompute``) rather than the recomputing fallback."""
    mode = os.environ.get(BACKWARD_ENV, "").strip() or "kernel"
    if mode not in BACKWARD_MODES:
        raise ValueError(f"{BACKWARD_ENV}={mode!r}: choose one of {', '.join(BACKWARD_MODES)}")
    return mode == "kernel" and feature <= MAX_FEATURE_DIM


def _config(f: int, device: torch.device) -> tuple[int, int, dict]:
    if device.type != "cuda":
        bt, bv = _INTERPRET_CONFIG
        return bt, bv, {}
    bt, bv, warps = _CUDA_CONFIG[block_k(f)]
    return bt, bv, {"num_warps": warps}


def _float32(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.to(torch.float32).contiguous()


def backward(
    spec: OpSpec,
    saved: tuple[torch.Tensor | None, ...],
    grads: tuple[torch.Tensor | None, ...],
    needs: tuple[bool, ...],
) -> list[torch.Tensor | None]:
    """Gradients of the Triton operators.

    Args:
        spec: the forward's options (``prefix``, ``mask`` [B, T] bool or None, ``prefix_lengths`` [B],
            ``output_final_state``, ``eps``).
        saved: ``(q, k, v, k_enc, v_enc, s0, z0, o)`` as the forward got them (``k_enc``/``v_enc`` None for
            ``linear_attention``, ``s0``/``z0`` None without an initial state) and its output ``o [B, T, H, Dv]``.
        grads: gradients of the outputs: ``(do,)`` or ``(do, dS_T, dz_T)``; any may be None.
        needs: which of ``q, k, v, k_enc, v_enc, s0, z0`` need a gradient.

    Returns:
        ``[dq, dk, dv, dk_enc, dv_enc, ds0, dz0]``, None where not needed, each in its input's dtype.
    """
    q_in, k_in, v_in, ke_in, ve_in, s0, z0, o = saved
    b, t, h, f = q_in.shape
    dv_dim = v_in.shape[-1]
    d = feature_dim(f)
    device = q_in.device
    q, k, v = (x.float() if x.dtype == torch.float64 else x for x in (q_in, k_in, v_in))
    bk = block_k(f)
    bt, bv, extra = _config(f, device)
    nv = triton.cdiv(dv_dim, bv)
    lowp, lowp_bf16 = lowp_flags(q, k, v)
    scale = f**-0.25
    keep8 = keep_bytes(spec.mask, device)

    # the initial state of the causal pass: the given one, plus the encoder state for prefix attention
    init = None if s0 is None else (_float32(s0), _float32(z0))
    in_prefix = None
    if spec.prefix:
        ke, ve = (x.float() if x.dtype == torch.float64 else x for x in (ke_in, ve_in))
        in_prefix = prefix_positions(spec.prefix_lengths, t, spec.mask)
        enc_s, enc_z = encoder_state(ke, ve, in_prefix, None)
        init = (enc_s, enc_z) if init is None else (enc_s + init[0], enc_z + init[1])
        init = (init[0].contiguous(), init[1].contiguous())

    do = grads[0] if grads[0] is not None else torch.zeros_like(o)
    delta = (do.float() * o.float()).sum(-1).contiguous()  # [B, T, H]
    final = grads[1:] if spec.output_final_state else ()
    ds_t = _float32(final[0]) if final and final[0] is not None else None
    dz_t = _float32(final[1]) if final and final[1] is not None else None
    if (ds_t is None) != (dz_t is None):
        ds_t = torch.zeros(b, h, d, dv_dim, device=device) if ds_t is None else ds_t
        dz_t = torch.zeros(b, h, d, device=device) if dz_t is None else dz_t

    den = torch.empty(b, t, h, device=device, dtype=torch.float32)
    dq_part = torch.empty(nv, b, t, h, f, device=device, dtype=torch.float32)
    dummy = den
    grid = (nv, b * h)
    kernels.bwd_dq_kernel[grid](
        q, k, v, do, delta, keep8 if keep8 is not None else dummy,
        init[0] if init is not None else dummy, init[1] if init is not None else dummy, den, dq_part,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        t, h, f, dv_dim, b * t * h * f,
        scale, float(spec.eps),
        BT=bt, BK=bk, BV=bv, HAS_KEEP=keep8 is not None, HAS_INIT=init is not None, LOWP=lowp,
        LOWP_BF16=lowp_bf16, **extra,
    )

    want_init = (s0 is not None and (needs[5] or needs[6])) or (spec.prefix and (needs[3] or needs[4]))
    dk_part = torch.empty(nv, b, t, h, f, device=device, dtype=torch.float32)
    dv = torch.empty(b, t, h, dv_dim, device=device, dtype=torch.float32)
    ds0 = torch.empty(b, h, d, dv_dim, device=device, dtype=torch.float32) if want_init else None
    dz0 = torch.empty(b, h, d, device=device, dtype=torch.float32) if want_init else None
    kernels.bwd_dkv_kernel[grid](
        q, k, v, do, delta, den, keep8 if keep8 is not None else dummy,
        ds_t if ds_t is not None else dummy, dz_t if dz_t is not None else dummy, dk_part, dv,
        ds0 if want_init else dummy, dz0 if want_init else dummy,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        t, h, f, dv_dim, b * t * h * f,
        scale,
        BT=bt, BK=bk, BV=bv, HAS_KEEP=keep8 is not None, HAS_DFINAL=ds_t is not None, STORE_DINIT=want_init,
        LOWP=lowp, LOWP_BF16=lowp_bf16, **extra,
    )

    dk_enc = dv_enc = None
    if spec.prefix and (needs[3] or needs[4]):
        dk_enc_part = torch.zeros(nv, b, t, h, f, device=device, dtype=torch.float32)
        dv_enc = torch.zeros(b, t, h, dv_dim, device=device, dtype=torch.float32)
        hit = in_prefix.any(dim=0).nonzero()
        cut = int(hit[-1]) + 1 if hit.numel() else 0  # positions past every prefix get no gradient
        if cut:
            lowp_e, lowp_bf16_e = lowp_flags(ke, ve)
            kernels.bwd_state_kv_kernel[(nv, b * h, triton.cdiv(cut, bt))](
                ke, ve, in_prefix.to(torch.int8).contiguous(), ds0, dz0, dk_enc_part, dv_enc,
                *ke.stride(), *ve.stride(),
                cut, t, h, f, dv_dim, b * t * h * f,
                scale,
                BT=bt, BK=bk, BV=bv, LOWP=lowp_e, LOWP_BF16=lowp_bf16_e, **extra,
            )
        dk_enc = dk_enc_part.sum(0).to(ke_in.dtype) if needs[3] else None
        dv_enc = dv_enc.to(ve_in.dtype) if needs[4] else None

    return [
        dq_part.sum(0).to(q_in.dtype) if needs[0] else None,
        dk_part.sum(0).to(k_in.dtype) if needs[1] else None,
        dv.to(v_in.dtype) if needs[2] else None,
        dk_enc,
        dv_enc,
        ds0.to(s0.dtype) if s0 is not None and needs[5] else None,
        dz0.to(z0.dtype) if z0 is not None and needs[6] else None,
    ]
