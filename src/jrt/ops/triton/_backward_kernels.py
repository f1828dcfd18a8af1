"""Triton backward kernels of Based linear attention and JRT-RNN's prefix linear attention.

Notation as in the forward kernels: ``x~ = x * F**-0.25``, ``s = q~ . k~ = q . k / sqrt(F)``,
``K = 1 + s + s^2/2`` and ``phi(x) = [1, x~, vec(x~ x~^T) / sqrt(2)]`` (``D = 1+F+F^2``); states and state
gradients are held split by order (rows ``0``, ``1..F``, ``1+F+i*F+j``), as ``[.., BV]`` blocks for the value
columns and as vectors for the denominator column.

The forward computes ``[num_i, den_i] = phi(q_i)^T P_0 + sum_{j<=i} m_j K_ij [v_j, 1]`` (``P_0 = [S_0, z_0]``,
``m_j`` the keep mask) and ``o_i = num_i / (den_i + eps)``. With ``den'_i = den_i + eps``, the gradient that
reaches ``[num_i, den_i]`` is ``[g_i, c_i]`` with ``g_i = dO_i / den'_i`` and ``c_i = -(dO_i . o_i) / den'_i``;
what is left is the backward of unnormalised kernel attention with augmented values ``v'_j = [v_j, 1]``:

* ``dK_ij = m_j (g_i . v_j + c_i)`` for ``j <= i`` (same chunk), and ``dK/ds = 1 + s``;
* ``dq_i = F**-0.25 * (sum_{j<=i} dK_ij (1 + s_ij) k~_j + J_phi(q_i)^T (P_c [g_i, c_i]))`` with ``P_c`` the
  state before ``i``'s chunk (forward sweep over the chunks: :func:`bwd_dq_kernel`);
* ``dv_j = m_j (sum_{i>=j} K_ij g_i + phi(k_j)^T dS_c)`` and
  ``dk_j = m_j F**-0.25 * (sum_{i>=j} dK_ij (1 + s_ij) q~_i + J_phi(k_j)^T (dP_c v'_j))`` with
  ``dP_c = [dS_c, dz_c] = dP_T + sum_{i after j's chunk} phi(q_i) [g_i, c_i]^T`` (reverse sweep:
  :func:`bwd_dkv_kernel`); after the first chunk ``dP`` is the gradient of the initial state ``P_0``;
* JRT-RNN's encoder state is part of ``P_0``: ``dve_j`` and ``dke_j`` are the same state-read terms with
  ``dP_0`` over the prefix positions (:func:`bwd_state_kv_kernel`).

``J_phi(x)^T u`` for ``u = [u0, u1, U2]`` is ``u1 + (U2 + U2^T) x~ / sqrt(2)`` (in ``x~``; times ``F**-0.25``).

The ``c`` terms (the denominator column) belong to the value block ``pid_v == 0`` only; ``dq`` and ``dk``
sum over all value columns, so every value block writes its own partial sums (``[NV, B, T, H, F]``) and the
launcher adds them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from jrt.ops.triton._jit_helpers import INV_SQRT2, dot


@triton.jit
def _quad_grad(u2, x, BT: tl.constexpr, BK: tl.constexpr):
    """``(U2 + U2^T) x / sqrt(2)`` per row: ``u2 [BT, BK*BK]`` (row-major ``(a, b)``), ``x [BT, BK]``."""
    u = tl.reshape(u2, [BT, BK, BK])
    return (tl.sum(u * x[:, None, :], axis=2) + tl.sum(u * x[:, :, None], axis=1)) * INV_SQRT2


@triton.jit
def _square(x, BT: tl.constexpr, BK: tl.constexpr):
    """``[BT, BK] -> [BT, BK*BK]``: the quadratic features ``x_a x_b / sqrt(2)``."""
    return tl.reshape(x[:, :, None] * x[:, None, :], [BT, BK * BK]) * INV_SQRT2


@triton.jit
def _state_read_grads(
    k, v, m, first, dh0, dh1, dh2, dz1, dz2,
    BT: tl.constexpr, BK: tl.constexpr, LOWP: tl.constexpr, LOWP_BF16: tl.constexpr,
):
    """Gradients of the state terms ``m_j phi(k_j) [v_j, 1]^T`` (``v`` already masked) under the state gradient
    ``dP = [dS (dh0, dh1, dh2), dz (dz1, dz2)]``: returns ``(dk~ [BT, BK], dv [BT, BV])``. ``first`` (0/1)
    says whether this value block also carries the denominator column."""
    k2 = _square(k, BT, BK)
    dv = (dh0[None, :] + dot(k, dh1, LOWP, LOWP_BF16) + dot(k2, dh2, LOWP, LOWP_BF16)) * m[:, None]
    w1 = dot(v, tl.trans(dh1), LOWP, LOWP_BF16) + first * dz1[None, :]
    w2 = dot(v, tl.trans(dh2), LOWP, LOWP_BF16) + first * dz2[None, :]
    dk = (w1 + _quad_grad(w2, k, BT, BK)) * m[:, None]
    return dk, dv


@triton.jit
def bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, delta_ptr, keep_ptr, s0_ptr, z0_ptr, den_ptr, dq_ptr,
    sqb, sqt, sqh, sqf,
    skb, skt, skh, skf,
    svb, svt, svh, svd,
    sdb, sdt, sdh, sdd,
    T, H, F, DV, NV_STRIDE,
    scale, eps,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_INIT: tl.constexpr, LOWP: tl.constexpr, LOWP_BF16: tl.constexpr,
):
    """Grid ``(cdiv(Dv, BV), B*H)``: the forward sweep. Rebuilds the denominator (stored in ``den [B, T, H]``
    by value block 0) and the running state ``P_c``, and writes value block ``pid_v``'s share of ``dq`` to
    ``dq_ptr[pid_v]`` (``[NV, B, T, H, F]`` float32, ``NV_STRIDE`` elements apart). ``delta [B, T, H]`` holds
    ``dO_i . o_i``; ``s0/z0`` the initial state ``[B, H, D, Dv]``/``[B, H, D]`` float32 (``HAS_INIT``)."""
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    D = 1 + F + F * F
    first = (pid_v == 0).to(tl.float32)

    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk = offs_k < F
    mv = offs_v < DV
    offs_2 = tl.arange(0, BK * BK)
    m2 = (offs_2 // BK < F) & (offs_2 % BK < F)
    row2 = 1 + F + (offs_2 // BK) * F + offs_2 % BK

    if HAS_INIT:
        sbase = s0_ptr + pid_bh * D * DV
        zbase = z0_ptr + pid_bh * D
        h1 = tl.load(sbase + (1 + offs_k)[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        h2 = tl.load(sbase + row2[:, None] * DV + offs_v[None, :], mask=m2[:, None] & mv[None, :], other=0.0)
        z0 = tl.load(zbase)
        z1 = tl.load(zbase + 1 + offs_k, mask=mk, other=0.0)
        z2 = tl.load(zbase + row2, mask=m2, other=0.0)
    else:
        h1 = tl.zeros([BK, BV], dtype=tl.float32)
        h2 = tl.zeros([BK * BK, BV], dtype=tl.float32)
        z0 = tl.sum(tl.zeros([BK], dtype=tl.float32), axis=0)
        z1 = tl.zeros([BK], dtype=tl.float32)
        z2 = tl.zeros([BK * BK], dtype=tl.float32)

    arange_t = tl.arange(0, BT)
    causal = arange_t[:, None] >= arange_t[None, :]
    for start in range(0, T, BT):
        offs_t = start + arange_t
        mt = offs_t < T
        mtk = mt[:, None] & mk[None, :]
        mtv = mt[:, None] & mv[None, :]
        q = tl.load(q_ptr + b * sqb + h * sqh + offs_t[:, None] * sqt + offs_k[None, :] * sqf, mask=mtk,
                    other=0.0).to(tl.float32) * scale
        k = tl.load(k_ptr + b * skb + h * skh + offs_t[:, None] * skt + offs_k[None, :] * skf, mask=mtk,
                    other=0.0).to(tl.float32) * scale
        v = tl.load(v_ptr + b * svb + h * svh + offs_t[:, None] * svt + offs_v[None, :] * svd, mask=mtv,
                    other=0.0).to(tl.float32)
        do = tl.load(do_ptr + b * sdb + h * sdh + offs_t[:, None] * sdt + offs_v[None, :] * sdd, mask=mtv,
                     other=0.0).to(tl.float32)
        keep = mt
        if HAS_KEEP:
            keep = keep & (tl.load(keep_ptr + b * T + offs_t, mask=mt, other=0) != 0)
        m = keep.to(tl.float32)
        v = v * m[:, None]

        # the denominator, as the forward computed it
        s = dot(q, tl.trans(k), LOWP, LOWP_BF16)
        valid = causal & keep[None, :]
        a = tl.where(valid, 1.0 + s + 0.5 * s * s, 0.0)
        q2 = _square(q, BT, BK)
        den = tl.sum(a, axis=1) + z0 + tl.sum(q * z1[None, :], axis=1) + tl.sum(q2 * z2[None, :], axis=1) + eps
        den = tl.where(mt, den, 1.0)
        row = (b * T + offs_t) * H + h
        if pid_v == 0:
            tl.store(den_ptr + row, den, mask=mt)
        delta = tl.load(delta_ptr + row, mask=mt, other=0.0)
        g = do / den[:, None]
        c = -delta / den * first

        # intra-chunk: dK_ij (1 + s_ij) k~_j; inter-chunk: J_phi(q_i)^T P_c [g_i, c_i]
        dk_ij = tl.where(valid, (dot(g, tl.trans(v), LOWP, LOWP_BF16) + c[:, None]) * (1.0 + s), 0.0)
        dq = dot(dk_ij, k, LOWP, LOWP_BF16)
        u1 = dot(g, tl.trans(h1), LOWP, LOWP_BF16) + c[:, None] * z1[None, :]
        u2 = dot(g, tl.trans(h2), LOWP, LOWP_BF16) + c[:, None] * z2[None, :]
        dq += u1 + _quad_grad(u2, q, BT, BK)
        tl.store(dq_ptr + pid_v.to(tl.int64) * NV_STRIDE + row[:, None] * F + offs_k[None, :], dq * scale, mask=mtk)

        # the state after this chunk
        k2 = _square(k, BT, BK)
        h1 += dot(tl.trans(k), v, LOWP, LOWP_BF16)
        h2 += dot(tl.trans(k2), v, LOWP, LOWP_BF16)
        z0 += tl.sum(m, axis=0)
        z1 += tl.sum(k * m[:, None], axis=0)
        z2 += tl.sum(k2 * m[:, None], axis=0)


@triton.jit
def bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, delta_ptr, den_ptr, keep_ptr, dsT_ptr, dzT_ptr, dk_ptr, dv_ptr, ds0_ptr, dz0_ptr,
    sqb, sqt, sqh, sqf,
    skb, skt, skh, skf,
    svb, svt, svh, svd,
    sdb, sdt, sdh, sdd,
    T, H, F, DV, NV_STRIDE,
    scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr,
    LOWP: tl.constexpr, LOWP_BF16: tl.constexpr,
):
    """Grid ``(cdiv(Dv, BV), B*H)``: the reverse sweep, from the final-state gradient ``dsT/dzT``
    (``HAS_DFINAL``) back to the first chunk. Writes ``dv [B, T, H, Dv]`` float32, value block ``pid_v``'s
    share of ``dk`` to ``dk_ptr[pid_v]`` (``[NV, B, T, H, F]``) and, with ``STORE_DINIT``, the initial-state
    gradient ``ds0 [B, H, D, Dv]`` / ``dz0 [B, H, D]``. ``den`` comes from :func:`bwd_dq_kernel`."""
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    D = 1 + F + F * F
    first = (pid_v == 0).to(tl.float32)

    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk = offs_k < F
    mv = offs_v < DV
    offs_2 = tl.arange(0, BK * BK)
    m2 = (offs_2 // BK < F) & (offs_2 % BK < F)
    row2 = 1 + F + (offs_2 // BK) * F + offs_2 % BK

    if HAS_DFINAL:
        sbase = dsT_ptr + pid_bh * D * DV
        zbase = dzT_ptr + pid_bh * D
        dh0 = tl.load(sbase + offs_v, mask=mv, other=0.0)
        dh1 = tl.load(sbase + (1 + offs_k)[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :],
                      other=0.0)
        dh2 = tl.load(sbase + row2[:, None] * DV + offs_v[None, :], mask=m2[:, None] & mv[None, :], other=0.0)
        dz0 = tl.load(zbase)
        dz1 = tl.load(zbase + 1 + offs_k, mask=mk, other=0.0)
        dz2 = tl.load(zbase + row2, mask=m2, other=0.0)
    else:
        dh0 = tl.zeros([BV], dtype=tl.float32)
        dh1 = tl.zeros([BK, BV], dtype=tl.float32)
        dh2 = tl.zeros([BK * BK, BV], dtype=tl.float32)
        dz0 = tl.sum(tl.zeros([BK], dtype=tl.float32), axis=0)
        dz1 = tl.zeros([BK], dtype=tl.float32)
        dz2 = tl.zeros([BK * BK], dtype=tl.float32)

    arange_t = tl.arange(0, BT)
    causal = arange_t[:, None] >= arange_t[None, :]
    n_chunks = tl.cdiv(T, BT)
    for back in range(0, n_chunks):
        offs_t = (n_chunks - 1 - back) * BT + arange_t
        mt = offs_t < T
        mtk = mt[:, None] & mk[None, :]
        mtv = mt[:, None] & mv[None, :]
        q = tl.load(q_ptr + b * sqb + h * sqh + offs_t[:, None] * sqt + offs_k[None, :] * sqf, mask=mtk,
                    other=0.0).to(tl.float32) * scale
        k = tl.load(k_ptr + b * skb + h * skh + offs_t[:, None] * skt + offs_k[None, :] * skf, mask=mtk,
                    other=0.0).to(tl.float32) * scale
        v = tl.load(v_ptr + b * svb + h * svh + offs_t[:, None] * svt + offs_v[None, :] * svd, mask=mtv,
                    other=0.0).to(tl.float32)
        do = tl.load(do_ptr + b * sdb + h * sdh + offs_t[:, None] * sdt + offs_v[None, :] * sdd, mask=mtv,
                     other=0.0).to(tl.float32)
        keep = mt
        if HAS_KEEP:
            keep = keep & (tl.load(keep_ptr + b * T + offs_t, mask=mt, other=0) != 0)
        m = keep.to(tl.float32)
        v = v * m[:, None]
        row = (b * T + offs_t) * H + h
        den = tl.load(den_ptr + row, mask=mt, other=1.0)
        delta = tl.load(delta_ptr + row, mask=mt, other=0.0)
        g = do / den[:, None]
        c = -delta / den * first

        # intra-chunk: dv_j = sum_i K_ij g_i, dk_j = sum_i dK_ij (1 + s_ij) q~_i over i >= j
        s = dot(q, tl.trans(k), LOWP, LOWP_BF16)
        valid = causal & keep[None, :]
        a = tl.where(valid, 1.0 + s + 0.5 * s * s, 0.0)
        dk_ij = tl.where(valid, (dot(g, tl.trans(v), LOWP, LOWP_BF16) + c[:, None]) * (1.0 + s), 0.0)
        dv = dot(tl.trans(a), g, LOWP, LOWP_BF16)
        dk = dot(tl.trans(dk_ij), q, LOWP, LOWP_BF16)

        # inter-chunk: this chunk's keys and values are read by every later query (and the final state)
        dk_s, dv_s = _state_read_grads(k, v, m, first, dh0, dh1, dh2, dz1, dz2, BT, BK, LOWP, LOWP_BF16)
        dk += dk_s
        dv += dv_s
        tl.store(dk_ptr + pid_v.to(tl.int64) * NV_STRIDE + row[:, None] * F + offs_k[None, :], dk * scale, mask=mtk)
        tl.store(dv_ptr + row[:, None] * DV + offs_v[None, :], dv, mask=mtv)

        # the state gradient before this chunk: add this chunk's queries
        q2 = _square(q, BT, BK)
        dh0 += tl.sum(g, axis=0)
        dh1 += dot(tl.trans(q), g, LOWP, LOWP_BF16)
        dh2 += dot(tl.trans(q2), g, LOWP, LOWP_BF16)
        dz0 += tl.sum(c, axis=0)
        dz1 += tl.sum(q * c[:, None], axis=0)
        dz2 += tl.sum(q2 * c[:, None], axis=0)

    if STORE_DINIT:
        sbase = ds0_ptr + pid_bh * D * DV
        tl.store(sbase + offs_v, dh0, mask=mv)
        tl.store(sbase + (1 + offs_k)[:, None] * DV + offs_v[None, :], dh1, mask=mk[:, None] & mv[None, :])
        tl.store(sbase + row2[:, None] * DV + offs_v[None, :], dh2, mask=m2[:, None] & mv[None, :])
        if pid_v == 0:
            zbase = dz0_ptr + pid_bh * D
            tl.store(zbase, dz0)
            tl.store(zbase + 1 + offs_k, dz1, mask=mk)
            tl.store(zbase + row2, dz2, mask=m2)


@triton.jit
def bwd_state_kv_kernel(
    k_ptr, v_ptr, keep_ptr, ds_ptr, dz_ptr, dk_ptr, dv_ptr,
    skb, skt, skh, skf,
    svb, svt, svh, svd,
    T, T_ALL, H, F, DV, NV_STRIDE,
    scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr, LOWP_BF16: tl.constexpr,
):
    """Grid ``(cdiv(Dv, BV), B*H, cdiv(T, BT))``: the gradients of a state ``sum_j m_j phi(k_j) [v_j, 1]^T``
    (JRT-RNN's encoder state, ``m = keep``) under its gradient ``ds [B, H, D, Dv]`` / ``dz [B, H, D]``, for the
    first ``T`` of ``T_ALL`` positions: ``dv [B, T_ALL, H, Dv]`` float32 and value block ``pid_v``'s share of
    ``dk`` in ``dk_ptr[pid_v]`` (``[NV, B, T_ALL, H, F]``)."""
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_t = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    D = 1 + F + F * F
    first = (pid_v == 0).to(tl.float32)

    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk = offs_k < F
    mv = offs_v < DV
    offs_2 = tl.arange(0, BK * BK)
    m2 = (offs_2 // BK < F) & (offs_2 % BK < F)
    row2 = 1 + F + (offs_2 // BK) * F + offs_2 % BK

    sbase = ds_ptr + pid_bh * D * DV
    zbase = dz_ptr + pid_bh * D
    dh0 = tl.load(sbase + offs_v, mask=mv, other=0.0)
    dh1 = tl.load(sbase + (1 + offs_k)[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
    dh2 = tl.load(sbase + row2[:, None] * DV + offs_v[None, :], mask=m2[:, None] & mv[None, :], other=0.0)
    dz1 = tl.load(zbase + 1 + offs_k, mask=mk, other=0.0)
    dz2 = tl.load(zbase + row2, mask=m2, other=0.0)

    offs_t = pid_t * BT + tl.arange(0, BT)
    mt = offs_t < T
    mtk = mt[:, None] & mk[None, :]
    mtv = mt[:, None] & mv[None, :]
    k = tl.load(k_ptr + b * skb + h * skh + offs_t[:, None] * skt + offs_k[None, :] * skf, mask=mtk,
                other=0.0).to(tl.float32) * scale
    v = tl.load(v_ptr + b * svb + h * svh + offs_t[:, None] * svt + offs_v[None, :] * svd, mask=mtv,
                other=0.0).to(tl.float32)
    m = (mt & (tl.load(keep_ptr + b * T_ALL + offs_t, mask=mt, other=0) != 0)).to(tl.float32)
    v = v * m[:, None]
    dk, dv = _state_read_grads(k, v, m, first, dh0, dh1, dh2, dz1, dz2, BT, BK, LOWP, LOWP_BF16)
    row = (b * T_ALL + offs_t) * H + h
    tl.store(dk_ptr + pid_v.to(tl.int64) * NV_STRIDE + row[:, None] * F + offs_k[None, :], dk * scale, mask=mtk)
    tl.store(dv_ptr + row[:, None] * DV + offs_v[None, :], dv, mask=mtv)
