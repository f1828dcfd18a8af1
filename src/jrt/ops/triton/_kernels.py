"""Triton kernels of Based linear attention with the Taylor feature map fused (``jrt.ops.triton``).

Notation: ``x~ = x * F**-0.25`` (queries and keys), so that ``s = q~ . k~ = q . k / sqrt(F)`` and the
full Taylor map is ``phi(x) = [1, x~, vec(x~ x~^T) / sqrt(2)]`` (``D = 1+F+F^2``). The kernels hold the
state in exactly that full form, split by order: ``S0 [Dv]`` (row 0), ``S1 [F, Dv]`` (rows ``1..F``) and
``S2 [F*F, Dv]`` (rows ``1+F+i*F+j``), and the denominator state ``z`` likewise, so states travel in and out
as ``(S [B, H, D, Dv], z [B, H, D])`` float32 with no conversion. ``phi`` is never written to memory: it is
rebuilt in registers from the loaded ``q``/``k`` tile (``F`` padded to ``BK``, a power of two >= 16).

Kernels (each program owns one ``(batch, head)`` pair and a block of ``BV`` value columns):

* :func:`causal_fwd_kernel` - the chunked causal pass over one segment of the sequence. Per chunk of
  ``BT`` tokens: intra-chunk ``tril(1 + s + s^2/2) @ v`` (its row sums give the intra-chunk denominator),
  inter-chunk ``phi(q) . S`` with the running state in registers, then the state update
  ``S += phi(k)^T v``; accumulation in float32.
* :func:`chunk_state_kernel` - the state of one segment: ``sum_j phi(k_j) [v_j, 1]^T`` over the kept
  positions (the JRT-RNN encoder state, and the per-segment states of the segmented causal pass).

Padding/masking: a ``keep`` byte per position (1 = the position enters the sums); dropped positions have
their key and ``[v, 1]`` row replaced by zeros (masking *after* the feature map, since ``phi(0) != 0``; a
select, not a multiply, so that a NaN or inf at a dropped position cannot leak).
"""

from __future__ import annotations

import triton
import triton.language as tl

from jrt.ops.triton._jit_helpers import INV_SQRT2, dot


@triton.jit
def causal_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, keep_ptr,
    s0_ptr, z0_ptr, sT_ptr, zT_ptr,
    sqb, sqt, sqh, sqf,
    skb, skt, skh, skf,
    svb, svt, svh, svd,
    sob, sot, soh, sod,
    T, H, F, DV, SEG_LEN, S0_SEG_STRIDE, Z0_SEG_STRIDE,
    scale, eps,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    LOWP: tl.constexpr, LOWP_BF16: tl.constexpr,
):
    """Grid ``(cdiv(Dv, BV), B*H, n_segments)``. Segment ``g`` covers positions ``[g*SEG_LEN, (g+1)*SEG_LEN)``
    and starts from the initial state ``s0_ptr[g]`` (``[n_seg, B, H, D, Dv]``; ``S0_SEG_STRIDE`` elements apart).
    Writes ``o [B, T, H, Dv]``; with ``STORE_FINAL`` (one segment) also the state after the last position."""
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*T*H*Dv may pass 2**31
    seg = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    D = 1 + F + F * F

    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk = offs_k < F
    mv = offs_v < DV
    offs_2 = tl.arange(0, BK * BK)
    i2 = offs_2 // BK
    j2 = offs_2 % BK
    m2 = (i2 < F) & (j2 < F)
    row2 = 1 + F + i2 * F + j2

    if HAS_INIT:
        sbase = s0_ptr + seg.to(tl.int64) * S0_SEG_STRIDE + pid_bh * D * DV
        zbase = z0_ptr + seg.to(tl.int64) * Z0_SEG_STRIDE + pid_bh * D
        h0 = tl.load(sbase + offs_v, mask=mv, other=0.0)
        h1 = tl.load(sbase + (1 + offs_k)[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        h2 = tl.load(sbase + row2[:, None] * DV + offs_v[None, :], mask=m2[:, None] & mv[None, :], other=0.0)
        z0 = tl.load(zbase)
        z1 = tl.load(zbase + 1 + offs_k, mask=mk, other=0.0)
        z2 = tl.load(zbase + row2, mask=m2, other=0.0)
    else:
        h0 = tl.zeros([BV], dtype=tl.float32)
        h1 = tl.zeros([BK, BV], dtype=tl.float32)
        h2 = tl.zeros([BK * BK, BV], dtype=tl.float32)
        z0 = tl.sum(tl.zeros([BK], dtype=tl.float32), axis=0)
        z1 = tl.zeros([BK], dtype=tl.float32)
        z2 = tl.zeros([BK * BK], dtype=tl.float32)

    t_start = seg * SEG_LEN
    t_end = tl.minimum(t_start + SEG_LEN, T)
    arange_t = tl.arange(0, BT)
    causal = arange_t[:, None] >= arange_t[None, :]
    for start in range(t_start, t_end, BT):
        offs_t = start + arange_t
        mt = offs_t < t_end
        q = tl.load(
            q_ptr + b * sqb + h * sqh + offs_t[:, None] * sqt + offs_k[None, :] * sqf,
            mask=mt[:, None] & mk[None, :], other=0.0,
        ).to(tl.float32) * scale
        k = tl.load(
            k_ptr + b * skb + h * skh + offs_t[:, None] * skt + offs_k[None, :] * skf,
            mask=mt[:, None] & mk[None, :], other=0.0,
        ).to(tl.float32) * scale
        v = tl.load(
            v_ptr + b * svb + h * svh + offs_t[:, None] * svt + offs_v[None, :] * svd,
            mask=mt[:, None] & mv[None, :], other=0.0,
        ).to(tl.float32)
        keep = mt
        if HAS_KEEP:
            keep = keep & (tl.load(keep_ptr + b * T + offs_t, mask=mt, other=0) != 0)
        m = keep.to(tl.float32)
        k = tl.where(keep[:, None], k, 0.0)
        v = tl.where(keep[:, None], v, 0.0)

        # intra-chunk: the Taylor kernel on q~ . k~, causal, dropped columns removed
        s = dot(q, tl.trans(k), LOWP, LOWP_BF16)
        a = 1.0 + s + 0.5 * s * s
        a = tl.where(causal & keep[None, :], a, 0.0)
        num = dot(a, v, LOWP, LOWP_BF16)
        den = tl.sum(a, axis=1)

        # inter-chunk: phi(q) . (S, z) with the state of the positions before this chunk
        q2 = tl.reshape(q[:, :, None] * q[:, None, :], [BT, BK * BK]) * INV_SQRT2
        num += h0[None, :] + dot(q, h1, LOWP, LOWP_BF16) + dot(q2, h2, LOWP, LOWP_BF16)
        den += z0 + tl.sum(q * z1[None, :], axis=1) + tl.sum(q2 * z2[None, :], axis=1)
        o = num / (den + eps)[:, None]
        tl.store(
            o_ptr + b * sob + h * soh + offs_t[:, None] * sot + offs_v[None, :] * sod,
            o.to(o_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :],
        )

        # state update with this chunk's kept positions
        k2 = tl.reshape(k[:, :, None] * k[:, None, :], [BT, BK * BK]) * INV_SQRT2
        h0 += tl.sum(v, axis=0)
        h1 += dot(tl.trans(k), v, LOWP, LOWP_BF16)
        h2 += dot(tl.trans(k2), v, LOWP, LOWP_BF16)
        z0 += tl.sum(m, axis=0)
        z1 += tl.sum(k * m[:, None], axis=0)
        z2 += tl.sum(k2 * m[:, None], axis=0)

    if STORE_FINAL:
        sbase = sT_ptr + pid_bh * D * DV
        tl.store(sbase + offs_v, h0, mask=mv)
        tl.store(sbase + (1 + offs_k)[:, None] * DV + offs_v[None, :], h1, mask=mk[:, None] & mv[None, :])
        tl.store(sbase + row2[:, None] * DV + offs_v[None, :], h2, mask=m2[:, None] & mv[None, :])
        if pid_v == 0:
            zbase = zT_ptr + pid_bh * D
            tl.store(zbase, z0)
            tl.store(zbase + 1 + offs_k, z1, mask=mk)
            tl.store(zbase + row2, z2, mask=m2)


@triton.jit
def chunk_state_kernel(
    k_ptr, v_ptr, keep_ptr, end_ptr, s_ptr, z_ptr,
    skb, skt, skh, skf,
    svb, svt, svh, svd,
    T, H, F, DV, SEG_LEN, S_SEG_STRIDE, Z_SEG_STRIDE,
    scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_END: tl.constexpr,
    LOWP: tl.constexpr, LOWP_BF16: tl.constexpr,
):
    """Grid ``(cdiv(Dv, BV), B*H, n_segments)``: ``s_ptr[g] = sum_j phi(k_j) v_j^T`` and
    ``z_ptr[g] = sum_j phi(k_j)`` over the kept positions ``j`` of segment ``g`` (before ``end_ptr[b]``
    when ``HAS_END``). Outputs ``[n_seg, B, H, D, Dv]`` and ``[n_seg, B, H, D]`` float32."""
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*T*H*Dv may pass 2**31
    seg = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    D = 1 + F + F * F

    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk = offs_k < F
    mv = offs_v < DV
    offs_2 = tl.arange(0, BK * BK)
    i2 = offs_2 // BK
    j2 = offs_2 % BK
    m2 = (i2 < F) & (j2 < F)
    row2 = 1 + F + i2 * F + j2

    h0 = tl.zeros([BV], dtype=tl.float32)
    h1 = tl.zeros([BK, BV], dtype=tl.float32)
    h2 = tl.zeros([BK * BK, BV], dtype=tl.float32)
    z0 = tl.zeros([BT], dtype=tl.float32)
    z1 = tl.zeros([BK], dtype=tl.float32)
    z2 = tl.zeros([BK * BK], dtype=tl.float32)

    t_start = seg * SEG_LEN
    t_end = tl.minimum(t_start + SEG_LEN, T)
    if HAS_END:
        t_end = tl.minimum(t_end, tl.load(end_ptr + b))
    arange_t = tl.arange(0, BT)
    for start in range(t_start, t_end, BT):
        offs_t = start + arange_t
        mt = offs_t < t_end
        k = tl.load(
            k_ptr + b * skb + h * skh + offs_t[:, None] * skt + offs_k[None, :] * skf,
            mask=mt[:, None] & mk[None, :], other=0.0,
        ).to(tl.float32) * scale
        v = tl.load(
            v_ptr + b * svb + h * svh + offs_t[:, None] * svt + offs_v[None, :] * svd,
            mask=mt[:, None] & mv[None, :], other=0.0,
        ).to(tl.float32)
        keep = mt
        if HAS_KEEP:
            keep = keep & (tl.load(keep_ptr + b * T + offs_t, mask=mt, other=0) != 0)
        m = keep.to(tl.float32)
        k = tl.where(keep[:, None], k, 0.0)
        v = tl.where(keep[:, None], v, 0.0)
        k2 = tl.reshape(k[:, :, None] * k[:, None, :], [BT, BK * BK]) * INV_SQRT2
        h0 += tl.sum(v, axis=0)
        h1 += dot(tl.trans(k), v, LOWP, LOWP_BF16)
        h2 += dot(tl.trans(k2), v, LOWP, LOWP_BF16)
        z0 += m
        z1 += tl.sum(k * m[:, None], axis=0)
        z2 += tl.sum(k2 * m[:, None], axis=0)

    sbase = s_ptr + seg.to(tl.int64) * S_SEG_STRIDE + pid_bh * D * DV
    tl.store(sbase + offs_v, h0, mask=mv)
    tl.store(sbase + (1 + offs_k)[:, None] * DV + offs_v[None, :], h1, mask=mk[:, None] & mv[None, :])
    tl.store(sbase + row2[:, None] * DV + offs_v[None, :], h2, mask=m2[:, None] & mv[None, :])
    if pid_v == 0:
        zbase = z_ptr + seg.to(tl.int64) * Z_SEG_STRIDE + pid_bh * D
        tl.store(zbase, tl.sum(z0, axis=0))
        tl.store(zbase + 1 + offs_k, z1, mask=mk)
        tl.store(zbase + row2, z2, mask=m2)
