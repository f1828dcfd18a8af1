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
* :func:`causal_fwd_kernel_vmajor` - the same pass with the state held transposed (``[BV, D]`` tiles).
* :func:`chunk_state_kernel` - the state of one segment: ``sum_j phi(k_j) [v_j, 1]^T`` over the kept
  positions (the JRT-RNN encoder state, and the per-segment states of the segmented causal pass).
* :func:`step_kernel` - one decoding step for a batch of states: ``S += phi(k) v^T``,
  ``o = phi(q) . S / (phi(q) . z + eps)``, tiled over the rows of ``S``.

Padding/masking: a ``keep`` byte per position (1 = the position enters the sums); dropped positions have
their ``[v, 1]`` row zeroed (masking *after* the feature map, since ``phi(0) != 0``).
"""

from __future__ import annotations

import triton
import triton.language as tl

INV_SQRT2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _dot(a, b, LOWP: tl.constexpr, LOWP_BF16: tl.constexpr):
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
        v = v * m[:, None]

        # intra-chunk: the Taylor kernel on q~ . k~, causal, dropped columns removed
        s = _dot(q, tl.trans(k), LOWP, LOWP_BF16)
        a = 1.0 + s + 0.5 * s * s
        a = tl.where(causal & keep[None, :], a, 0.0)
        num = _dot(a, v, LOWP, LOWP_BF16)
        den = tl.sum(a, axis=1)

        # inter-chunk: phi(q) . (S, z) with the state of the positions before this chunk
        q2 = tl.reshape(q[:, :, None] * q[:, None, :], [BT, BK * BK]) * INV_SQRT2
        num += h0[None, :] + _dot(q, h1, LOWP, LOWP_BF16) + _dot(q2, h2, LOWP, LOWP_BF16)
        den += z0 + tl.sum(q * z1[None, :], axis=1) + tl.sum(q2 * z2[None, :], axis=1)
        o = num / (den + eps)[:, None]
        tl.store(
            o_ptr + b * sob + h * soh + offs_t[:, None] * sot + offs_v[None, :] * sod,
            o.to(o_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :],
        )

        # state update with this chunk's kept positions
        k2 = tl.reshape(k[:, :, None] * k[:, None, :], [BT, BK * BK]) * INV_SQRT2
        h0 += tl.sum(v, axis=0)
        h1 += _dot(tl.trans(k), v, LOWP, LOWP_BF16)
        h2 += _dot(tl.trans(k2), v, LOWP, LOWP_BF16)
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
def causal_fwd_kernel_vmajor(
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
    """:func:`causal_fwd_kernel` with the state held value-major (``S^T`` tiles ``[BV, D]``) and the output
    computed transposed (``o^T = S^T phi(q)^T``): the running state is then the left operand of its products,
    which Triton can feed from the accumulator registers without a trip through shared memory. Same
    arguments and results; chosen with ``state_layout="v_major"``."""
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
        h1 = tl.load(sbase + (1 + offs_k)[None, :] * DV + offs_v[:, None], mask=mk[None, :] & mv[:, None], other=0.0)
        h2 = tl.load(sbase + row2[None, :] * DV + offs_v[:, None], mask=m2[None, :] & mv[:, None], other=0.0)
        z0 = tl.load(zbase)
        z1 = tl.load(zbase + 1 + offs_k, mask=mk, other=0.0)
        z2 = tl.load(zbase + row2, mask=m2, other=0.0)
    else:
        h0 = tl.zeros([BV], dtype=tl.float32)
        h1 = tl.zeros([BV, BK], dtype=tl.float32)
        h2 = tl.zeros([BV, BK * BK], dtype=tl.float32)
        z0 = tl.sum(tl.zeros([BK], dtype=tl.float32), axis=0)
        z1 = tl.zeros([BK], dtype=tl.float32)
        z2 = tl.zeros([BK * BK], dtype=tl.float32)

    t_start = seg * SEG_LEN
    t_end = tl.minimum(t_start + SEG_LEN, T)
    arange_t = tl.arange(0, BT)
    causal_t = arange_t[:, None] <= arange_t[None, :]  # [j, i]: key j at or before query i
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
        vt = tl.load(
            v_ptr + b * svb + h * svh + offs_t[None, :] * svt + offs_v[:, None] * svd,
            mask=mt[None, :] & mv[:, None], other=0.0,
        ).to(tl.float32)
        keep = mt
        if HAS_KEEP:
            keep = keep & (tl.load(keep_ptr + b * T + offs_t, mask=mt, other=0) != 0)
        m = keep.to(tl.float32)
        vt = vt * m[None, :]
        qt = tl.trans(q)

        # intra-chunk, transposed: aT[j, i] = 1 + s + s^2/2 for kept keys j <= i
        st = _dot(k, qt, LOWP, LOWP_BF16)
        at = 1.0 + st + 0.5 * st * st
        at = tl.where(causal_t & keep[:, None], at, 0.0)
        num = _dot(vt, at, LOWP, LOWP_BF16)  # [BV, BT]
        den = tl.sum(at, axis=0)

        # inter-chunk: the state (held transposed, [BV, rows]) read by phi(q)
        q2t = tl.reshape(qt[:, None, :] * qt[None, :, :], [BK * BK, BT]) * INV_SQRT2
        num += h0[:, None] + _dot(h1, qt, LOWP, LOWP_BF16) + _dot(h2, q2t, LOWP, LOWP_BF16)
        den += z0 + tl.sum(qt * z1[:, None], axis=0) + tl.sum(q2t * z2[:, None], axis=0)
        o = num / (den + eps)[None, :]
        tl.store(
            o_ptr + b * sob + h * soh + offs_t[None, :] * sot + offs_v[:, None] * sod,
            o.to(o_ptr.dtype.element_ty), mask=mt[None, :] & mv[:, None],
        )

        # state update with this chunk's kept positions
        k2 = tl.reshape(k[:, :, None] * k[:, None, :], [BT, BK * BK]) * INV_SQRT2
        h0 += tl.sum(vt, axis=1)
        h1 += _dot(vt, k, LOWP, LOWP_BF16)
        h2 += _dot(vt, k2, LOWP, LOWP_BF16)
        z0 += tl.sum(m, axis=0)
        z1 += tl.sum(k * m[:, None], axis=0)
        z2 += tl.sum(k2 * m[:, None], axis=0)

    if STORE_FINAL:
        sbase = sT_ptr + pid_bh * D * DV
        tl.store(sbase + offs_v, h0, mask=mv)
        tl.store(sbase + (1 + offs_k)[None, :] * DV + offs_v[:, None], h1, mask=mk[None, :] & mv[:, None])
        tl.store(sbase + row2[None, :] * DV + offs_v[:, None], h2, mask=m2[None, :] & mv[:, None])
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
        v = v * m[:, None]
        k2 = tl.reshape(k[:, :, None] * k[:, None, :], [BT, BK * BK]) * INV_SQRT2
        h0 += tl.sum(v, axis=0)
        h1 += _dot(tl.trans(k), v, LOWP, LOWP_BF16)
        h2 += _dot(tl.trans(k2), v, LOWP, LOWP_BF16)
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


@triton.jit
def step_kernel(
    q_ptr, k_ptr, v_ptr, keep_ptr, s_ptr, z_ptr, o_ptr, s_out_ptr, z_out_ptr,
    sqb, sqh, sqf,
    skb, skh, skf,
    svb, svh, svd,
    sob, soh, sod,
    H, F, DV,
    scale, eps,
    BR: tl.constexpr, BV: tl.constexpr, HAS_KEEP: tl.constexpr,
):
    """Grid ``(cdiv(Dv, BV), B*H)``: one token per sequence. Reads ``S [B, H, D, Dv]``, ``z [B, H, D]``
    (contiguous float32), writes the updated state to ``s_out``/``z_out`` and ``o [B, H, Dv]``. Sequences
    with ``keep == 0`` leave their state unchanged (their output reads the unchanged state)."""
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*T*H*Dv may pass 2**31
    b = pid_bh // H
    h = pid_bh % H
    D = 1 + F + F * F

    offs_v = pid_v * BV + tl.arange(0, BV)
    mv = offs_v < DV
    v = tl.load(v_ptr + b * svb + h * svh + offs_v * svd, mask=mv, other=0.0).to(tl.float32)
    keep = 1.0
    if HAS_KEEP:
        keep = (tl.load(keep_ptr + b) != 0).to(tl.float32)
    v = v * keep
    num = tl.zeros([BV], dtype=tl.float32)
    den = tl.zeros([BR], dtype=tl.float32)
    qb = q_ptr + b * sqb + h * sqh
    kb = k_ptr + b * skb + h * skh
    for r0 in range(0, D, BR):
        r = r0 + tl.arange(0, BR)
        mr = r < D
        is1 = (r >= 1) & (r <= F)
        is2 = (r > F) & mr
        i1 = tl.maximum(r - 1, 0)
        rq = tl.maximum(r - 1 - F, 0)
        i2 = rq // F
        j2 = rq % F
        ia = tl.where(is2, i2, tl.minimum(i1, F - 1))
        qa = tl.load(qb + ia * sqf, mask=is1 | is2, other=0.0).to(tl.float32) * scale
        qc = tl.load(qb + j2 * sqf, mask=is2, other=0.0).to(tl.float32) * scale
        ka = tl.load(kb + ia * skf, mask=is1 | is2, other=0.0).to(tl.float32) * scale
        kc = tl.load(kb + j2 * skf, mask=is2, other=0.0).to(tl.float32) * scale
        phi_q = tl.where(r == 0, 1.0, tl.where(is1, qa, qa * qc * INV_SQRT2))
        phi_k = tl.where(r == 0, 1.0, tl.where(is1, ka, ka * kc * INV_SQRT2))
        phi_q = tl.where(mr, phi_q, 0.0)
        phi_k = tl.where(mr, phi_k, 0.0) * keep

        sbase = pid_bh * D * DV
        st = tl.load(s_ptr + sbase + r[:, None] * DV + offs_v[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        st += phi_k[:, None] * v[None, :]
        tl.store(s_out_ptr + sbase + r[:, None] * DV + offs_v[None, :], st, mask=mr[:, None] & mv[None, :])
        num += tl.sum(phi_q[:, None] * st, axis=0)
        zt = tl.load(z_ptr + pid_bh * D + r, mask=mr, other=0.0) + phi_k
        den += phi_q * zt
        if pid_v == 0:
            tl.store(z_out_ptr + pid_bh * D + r, zt, mask=mr)
    o = num / (tl.sum(den, axis=0) + eps)
    tl.store(o_ptr + b * sob + h * soh + offs_v * sod, o.to(o_ptr.dtype.element_ty), mask=mv)
