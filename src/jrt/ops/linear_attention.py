"""Causal Based linear attention and JRT-RNN's prefix linear attention.

Notation (DESIGN.md section 2): ``phi`` is the Taylor feature map, ``D = 1+F+F^2`` its dimension.

``linear_attention``::

    o_i = phi(q_i) . S_i / (phi(q_i) . z_i + eps)
    S_i = S_0 + sum_{j<=i} phi(k_j) v_j^T,   z_i = z_0 + sum_{j<=i} phi(k_j)

``prefix_linear_attention`` adds, for every position, the non-causal encoder sum over the first ``M_b``
(real) tokens of sequence ``b``::

    o_i = phi(q_i) . (S_i + S_enc) / (phi(q_i) . (z_i + z_enc) + eps)
    S_enc = sum_{j<M_b} phi(ke_j) ve_j^T,   z_enc = sum_{j<M_b} phi(ke_j)

It is computed as one encoder state per sequence followed by the causal pass started from it, so its cost
is linear in T. Padded positions (``attention_mask == 0``) are removed from every sum *after* the feature
map (``phi(0) != 0``), which is done by zeroing the padded rows of ``[v, 1]``.

Three forms: ``reference`` (quadratic, explicit ``phi``), ``chunk`` (intra-chunk ``1 + s + s^2/2`` on
``q . k``, inter-chunk state passing in the compressed feature space; linear in T) and ``recurrent`` (a
token loop, the decoding form). All accumulate in float32 (float64 for float64 inputs) and exchange the
state ``(S [B, H, D, Dv], z [B, H, D])`` in float32 with the full map's ``D``.
"""

from __future__ import annotations

import contextlib
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from jrt.ops._checks import (
    check_float,
    check_impl,
    check_mask,
    check_prefix_lengths,
    check_qkv,
    check_state,
    compute_dtype,
)
from jrt.ops.feature_map import feature_dim, taylor_feature_map

State = tuple[torch.Tensor, torch.Tensor]

#: Environment variable that forces the implementation chosen by ``impl="auto"`` (e.g. ``chunk``).
IMPL_ENV = "JRT_OPS_IMPL"
#: Chunk length of the chunked form, and the number of tokens processed per vectorised segment (bounds
#: the working memory to ``O(segment * D)`` whatever the sequence length).
CHUNK_SIZE = 64
SEGMENT_SIZE = 8192


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------


def triton_available() -> bool:
    """True when the Triton kernels (``jrt.ops.triton``) import."""
    try:
        import jrt.ops.triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installation
        return False
    return True


def resolve_impl(impl: str, device: torch.device, length: int, feature: int | None = None) -> str:
    """The implementation that ``impl`` stands for on ``device`` for ``length`` tokens of feature dim ``feature``.

    ``auto`` honours ``JRT_OPS_IMPL`` when set; otherwise it takes Triton on CUDA when it imports and supports
    the feature dim, the token loop for single tokens (decoding), and the chunked form everywhere else.
    """
    check_impl(impl)
    if impl != "auto":
        return impl
    forced = os.environ.get(IMPL_ENV, "").strip()
    if forced and forced != "auto":
        return check_impl(forced)
    if device.type == "cuda" and triton_available():
        import jrt.ops.triton as kernels

        if feature is None or feature <= kernels.MAX_FEATURE_DIM:
            return "triton"
    return "recurrent" if length == 1 else "chunk"


# --------------------------------------------------------------------------------------------------
# internal layout: [B, H, T, *] in the compute dtype, values augmented with a ones column
# --------------------------------------------------------------------------------------------------


def _exact(device: torch.device):
    """Switch autocast off: the operators choose their own precision (float32 accumulation)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _to_bhtd(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).transpose(1, 2)


def _augment(v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``[B, H, T, Dv] -> [B, H, T, Dv+1]``: append the ones column of the denominator, zero dropped rows."""
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    if keep is not None:
        v1 = v1 * keep[:, None, :, None].to(v1.dtype)
    return v1


def _pack_state(state: State | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``(S [B,H,D,Dv], z [B,H,D]) -> [B, H, D, Dv+1]``."""
    if state is None:
        return None
    s, z = state
    return torch.cat([s.to(dtype), z.to(dtype).unsqueeze(-1)], dim=-1)


def _unpack_state(packed: torch.Tensor) -> State:
    # float32 state for float32/bfloat16 inputs, float64 for float64 inputs (compute dtype either way)
    return packed[..., :-1], packed[..., -1]


def _normalise(o1: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, T, Dv+1] -> [B, T, H, Dv]``: numerator over denominator."""
    o1 = o1.transpose(1, 2)
    den = o1[..., -1:] + eps
    if o1.requires_grad:
        return (o1[..., :-1] / den).to(out_dtype)
    out = torch.empty(o1.shape[:-1] + (o1.shape[-1] - 1,), dtype=o1.dtype, device=o1.device)
    return torch.div(o1[..., :-1], den, out=out).to(out_dtype)


# --------------------------------------------------------------------------------------------------
# the three forms of the causal core, on [B, H, T, *]
# --------------------------------------------------------------------------------------------------


def _causal_reference(q, k, v1, state0):
    """Quadratic form with the explicit full feature map. Returns ``(o1, packed state)``."""
    phi_q, phi_k = taylor_feature_map(q), taylor_feature_map(k)
    t = q.shape[-2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~causal, 0.0)
    o1 = scores @ v1
    state = phi_k.transpose(-1, -2) @ v1
    if state0 is not None:
        o1 = o1 + phi_q @ state0
        state = state + state0
    return o1, state


def _causal_recurrent(q, k, v1, state0):
    """Token loop with the full feature map: the decoding form."""
    b, h, t, f = q.shape
    state = state0.clone() if state0 is not None else q.new_zeros(b, h, feature_dim(f), v1.shape[-1])
    phi_q, phi_k = taylor_feature_map(q), taylor_feature_map(k)
    outputs = []
    for i in range(t):
        state = state + phi_k[:, :, i, :, None] * v1[:, :, i, None, :]
        outputs.append((phi_q[:, :, i, None, :] @ state).squeeze(-2))
    return torch.stack(outputs, dim=2), state


# The chunked form works in an internal, compressed feature space that is cheap to build per token:
#   keys    phi_k(k) = [1, k', k'_a k'_b (a <= b)]  with k' = k / sqrt(F)   (1 + F + F(F+1)/2 rows),
#   queries phi_q(q) = [1, q,  q_a q_b  (a <= b)],
# and a state  U = sum_j w * phi_k(k_j) [v_j, 1]^T  whose diagonal rows (a == b) carry w = 1/2, so that
# phi_q(q) . U reads exactly  sum_j (1 + s_j + s_j^2/2) [v_j, 1]  with  s_j = q.k_j / sqrt(F).
# ``_to_internal`` / ``_to_canonical`` convert from / to the canonical state over the full map's D rows.


def _features(x: torch.Tensor) -> torch.Tensor:
    """``[..., F] -> [..., 1+F+F(F+1)/2]``: ``[1, x, x_a x_b (a <= b, row-major upper triangle)]``."""
    f = x.shape[-1]
    return torch.cat([torch.ones_like(x[..., :1]), x] + [x[..., a : a + 1] * x[..., a:] for a in range(f)], dim=-1)


def _diagonal_weights(f: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``[1+F+F(F+1)/2, 1]``: 1/2 on the rows of the squares ``x_a^2``, 1 elsewhere."""
    rows, cols = torch.triu_indices(f, f)
    w = torch.ones(1 + f + rows.numel(), dtype=dtype, device=device)
    w[1 + f :][rows == cols] = 0.5
    return w.unsqueeze(-1)


def _to_internal(state: torch.Tensor, f: int) -> torch.Tensor:
    """Canonical ``[..., 1+F+F^2, X]`` -> internal ``[..., 1+F+F(F+1)/2, X]`` with equal reads."""
    rows, cols = (i.to(state.device) for i in torch.triu_indices(f, f))
    quad = state[..., 1 + f :, :].unflatten(-2, (f, f))
    upper, lower = quad[..., rows, cols, :], quad[..., cols, rows, :]
    sym = torch.where((rows == cols).unsqueeze(-1), upper, upper + lower)
    return torch.cat([state[..., :1, :], state[..., 1 : 1 + f, :] * f**-0.25, sym / math.sqrt(2.0 * f)], dim=-2)


def _to_canonical(internal: torch.Tensor, f: int) -> torch.Tensor:
    """Internal ``[..., 1+F+F(F+1)/2, X]`` -> canonical ``[..., 1+F+F^2, X]`` (the quadratic block symmetric)."""
    rows, cols = (i.to(internal.device) for i in torch.triu_indices(f, f))
    tri = internal[..., 1 + f :, :] * math.sqrt(2.0 * f)
    tri = torch.where((rows == cols).unsqueeze(-1), tri, 0.5 * tri)
    quad = internal.new_zeros(*internal.shape[:-2], f, f, internal.shape[-1])
    quad[..., rows, cols, :] = tri
    quad[..., cols, rows, :] = tri
    lin = internal[..., 1 : 1 + f, :] * f**0.25
    return torch.cat([internal[..., :1, :], lin, quad.flatten(-3, -2)], dim=-2)


def _causal_chunk(
    q, k, v1, state0, encoder=None, chunk_size: int | None = None, segment_size: int | None = None
):
    """Chunked form, linear in T, on ``[B, H, T, *]``.

    ``encoder = (k_enc [B, H, L, F], v1_enc [B, H, L, Dv+1])`` (prefix linear attention; rows outside the
    prefix zeroed): its state is added to the initial state of each block.

    Intra-chunk: ``tril(1 + s + s^2/2) @ [v, 1]`` with ``s = q.k/sqrt(F)``; inter-chunk: exclusive prefix sums
    of per-chunk states in the internal feature space above. The work is vectorised over the chunks of a block
    of (sequence, head) pairs and one segment of time at a time, so that every operand is contiguous and the
    working memory is bounded by the segment, whatever B, H and T are; on a multi-core CPU the blocks (with
    their encoder sums) run in a thread pool.
    """
    b, h, t, f = q.shape
    c = min(chunk_size or CHUNK_SIZE, t)
    differentiable = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v1, state0) if x is not None)
    pad = (-t) % c
    if pad:
        # zero rows of [v, 1] add nothing to any sum; the padded outputs are cut off below
        q, k, v1 = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v1))
    n_chunks, bh, dv1 = (t + pad) // c, b * h, v1.shape[-1]
    q = q.reshape(bh, n_chunks, c, f).contiguous()
    k = (k * f**-0.5).reshape(bh, n_chunks, c, f).contiguous()
    v1 = v1.reshape(bh, n_chunks, c, dv1).contiguous()
    weights = _diagonal_weights(f, q.dtype, q.device)
    if state0 is not None:
        states = _to_internal(state0.reshape(bh, -1, dv1), f)
    else:
        states = q.new_zeros(bh, feature_dim(f, compressed=True), dv1)
    if encoder is not None:
        enc_k, enc_v1 = (x.reshape(bh, x.shape[-2], x.shape[-1]) for x in encoder)
    # blocks of G (sequence, head) pairs x n chunks: whole sequences of several heads when they are short,
    # one head and a segment of time when they are long; every block is contiguous
    budget = max(1, (segment_size or SEGMENT_SIZE) // c)
    per_segment = min(n_chunks, budget)
    group = max(1, budget // n_chunks) if per_segment == n_chunks else 1
    outputs = None if differentiable else torch.empty_like(v1)
    pieces: list[torch.Tensor] = []
    def run_block(g0: int, g1: int) -> torch.Tensor:
        """Heads ``g0:g1`` over all segments; returns their final internal state ``[G, Dc, Dv+1]``."""
        state = states[g0:g1]  # [G, Dc, Dv+1]
        if encoder is not None:
            state = state + _encoder_state_internal(enc_k[g0:g1], enc_v1[g0:g1])
        for start in range(0, n_chunks, per_segment):
            stop = min(start + per_segment, n_chunks)
            qc, kc, vc = (x[g0:g1, start:stop] for x in (q, k, v1))  # [G, n, C, *]
            # intra-chunk: 1 + s + s^2/2 on the causal triangle
            scores = qc @ kc.transpose(-1, -2)
            scores = torch.addcmul(scores, scores, scores, value=0.5).add_(1.0).tril_()
            if differentiable:
                o1 = scores @ vc
            else:
                o1 = torch.matmul(scores, vc, out=outputs[g0:g1, start:stop])
            # inter-chunk: per-chunk states, their exclusive prefix sums, read with the query features
            chunk_states = _features(kc).transpose(-1, -2) @ vc  # [G, n, Dc, Dv+1]
            if differentiable:
                chunk_states = chunk_states * weights
                before = torch.cat([state.unsqueeze(1), chunk_states[:, :-1]], dim=1).cumsum(dim=1)
                state = before[:, -1] + chunk_states[:, -1]
                pieces.append(o1 + _features(qc) @ before)
            else:
                chunk_states.mul_(weights)
                before = torch.empty_like(chunk_states)
                running = state
                for j in range(chunk_states.shape[1]):  # a loop of adds beats cumsum over a leading dim
                    before[:, j] = running
                    running = running + chunk_states[:, j]
                state = running
                flat = (-1, c, dv1)
                o1.view(flat).baddbmm_(_features(qc).view(-1, c, before.shape[-2]), before.view(-1, *before.shape[2:]))
        return state

    blocks = [(g0, min(g0 + group, bh)) for g0 in range(0, bh, group)]
    threads = torch.get_num_threads()
    if not differentiable and q.device.type == "cpu" and threads > 1 and len(blocks) > 1:
        # independent blocks on a CPU: one block per thread (each single-threaded) beats splitting every
        # small operation across threads
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=min(threads, len(blocks))) as pool:
                finals = list(pool.map(lambda span: run_block(*span), blocks))
        finally:
            torch.set_num_threads(threads)
    else:
        finals = [run_block(g0, g1) for g0, g1 in blocks]
    if differentiable:
        # pieces are ordered by head group, then by segment
        rows = []
        per_group = -(-n_chunks // per_segment)
        for g in range(0, len(pieces), per_group):
            rows.append(torch.cat(pieces[g : g + per_group], dim=1))
        outputs = torch.cat(rows, dim=0)
    o1 = outputs.reshape(b, h, n_chunks * c, dv1)[:, :, :t]
    return o1, _to_canonical(torch.cat(finals), f).reshape(b, h, -1, dv1)


_CAUSAL_FORMS = {"reference": _causal_reference, "recurrent": _causal_recurrent, "chunk": _causal_chunk}


def _encoder_state_internal(k_enc: torch.Tensor, v1_enc: torch.Tensor) -> torch.Tensor:
    """``sum_j w * phi_k(ke_j) [ve_j, 1]^T`` in the chunked form's internal space: ``[..., Dc, Dv+1]``.

    ``k_enc [..., L, F]`` and ``v1_enc [..., L, Dv+1]`` (rows outside the prefix zeroed) cover the positions
    up to the last prefix token only; the sum runs over segments so that the features stay small.
    """
    f = k_enc.shape[-1]
    k_enc = k_enc * f**-0.5
    total = None
    for start in range(0, k_enc.shape[-2], SEGMENT_SIZE):
        part = _features(k_enc[..., start : start + SEGMENT_SIZE, :].contiguous()).transpose(-1, -2)
        part = part @ v1_enc[..., start : start + SEGMENT_SIZE, :]
        total = part if total is None else total + part
    return total * _diagonal_weights(f, total.dtype, total.device)


def _run_triton(name: str, *args, **kwargs):
    if not triton_available():
        raise ValueError(
            "impl='triton' needs the Triton kernels (pip install 'just-read-twice[triton]' and a CUDA device, "
            "or TRITON_INTERPRET=1 for CPU tensors)"
        )
    import jrt.ops.triton as kernels

    return getattr(kernels, name)(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# public operators
# --------------------------------------------------------------------------------------------------


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    initial_state: State | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    attention_mask: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, State | None]:
    """Causal, normalised Based linear attention with the Taylor feature map applied inside.

    Args:
        q, k: ``[B, T, H, F]`` raw query/key projections.
        v: ``[B, T, H, Dv]`` values.
        initial_state: ``(S [B, H, D, Dv], z [B, H, D])`` carried over from the previous part of the
            sequences (``D = 1+F+F^2``); running two halves with state handoff equals running the whole.
        output_final_state: also return the state after the last position.
        eps: added to the denominator.
        attention_mask: ``[B, T]``, 1 for tokens and 0 for padding (left or right); padded positions add
            nothing to any sum (their own outputs are meaningless).
        impl: ``"reference"`` (quadratic), ``"chunk"`` (linear in T), ``"recurrent"`` (token loop),
            ``"triton"`` (GPU kernels) or ``"auto"``.

    Returns:
        ``(o, state)``: ``o [B, T, H, Dv]`` in ``v``'s dtype; ``state = (S, z)`` in float32 (float64 for
        float64 inputs), or None when ``output_final_state`` is False.
    """
    check_qkv(q, k, v)
    b, t, h, f = q.shape
    dv = v.shape[-1]
    impl = resolve_impl(impl, q.device, t, f)
    mask = check_mask(attention_mask, b, t, q.device)
    state0 = check_state(initial_state, b, h, feature_dim(f), dv, q.device)
    if impl == "triton":
        return _run_triton(
            "linear_attention", q, k, v, initial_state=state0, output_final_state=output_final_state,
            eps=eps, attention_mask=mask,
        )
    dtype = compute_dtype(q, k, v)
    with _exact(q.device):
        qh, kh = _to_bhtd(q, dtype), _to_bhtd(k, dtype)
        v1 = _augment(_to_bhtd(v, dtype), mask)
        o1, state = _CAUSAL_FORMS[impl](qh, kh, v1, _pack_state(state0, dtype))
    return _normalise(o1, eps, v.dtype), (_unpack_state(state) if output_final_state else None)


def prefix_positions(prefix_lengths: torch.Tensor, length: int, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, T]`` bool: the positions that belong to each sequence's prefix (its first ``M_b`` real tokens)."""
    if mask is None:
        index = torch.arange(length, device=prefix_lengths.device).expand(prefix_lengths.shape[0], length)
        return index < prefix_lengths[:, None]
    index = mask.long().cumsum(-1) - 1  # index among real tokens
    return mask & (index < prefix_lengths[:, None])


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
    impl: str = "auto",
) -> tuple[torch.Tensor, State | None]:
    """JRT-RNN's prefix linear attention: the causal pass plus a non-causal read of each prefix.

    Args:
        q, k: ``[B, T, H, F]`` decoder query/key projections; ``v``: ``[B, T, H, Dv]``.
        k_enc, v_enc: ``[B, T, H, F]`` and ``[B, T, H, Dv]``, the encoder projections at the same positions.
        prefix_lengths: int ``[B]``, the prefix length ``M_b`` of each sequence counted in real tokens
            (0 allowed: the op then equals :func:`linear_attention`).
        attention_mask: ``[B, T]``, 1 = token, 0 = padding (left or right); pads add nothing to any sum.
        initial_state: ``(S, z)`` from an earlier part of the sequences; the encoder sum of this call is
            added to it.
        output_final_state: return the decoding state ``(S_T + S_enc, z_T + z_enc)``.
        eps: added to the shared denominator.
        impl: as in :func:`linear_attention`.

    Returns:
        ``(o [B, T, H, Dv] in v's dtype, state or None)``.
    """
    check_qkv(q, k, v)
    check_float("k_enc", k_enc, 4)
    check_float("v_enc", v_enc, 4)
    if k_enc.shape != k.shape or v_enc.shape != v.shape:
        raise ValueError(
            f"k_enc/v_enc must have the shapes of k/v, got k_enc {tuple(k_enc.shape)} vs k {tuple(k.shape)}, "
            f"v_enc {tuple(v_enc.shape)} vs v {tuple(v.shape)}"
        )
    b, t, h, f = q.shape
    dv = v.shape[-1]
    impl = resolve_impl(impl, q.device, t, f)
    mask = check_mask(attention_mask, b, t, q.device)
    lengths = check_prefix_lengths(prefix_lengths, b, t, mask, q.device)
    state0 = check_state(initial_state, b, h, feature_dim(f), dv, q.device)
    if impl == "triton":
        return _run_triton(
            "prefix_linear_attention", q, k, v, k_enc, v_enc, lengths, attention_mask=mask,
            initial_state=state0, output_final_state=output_final_state, eps=eps,
        )
    dtype = compute_dtype(q, k, v, k_enc, v_enc)
    with _exact(q.device):
        in_prefix = prefix_positions(lengths, t, mask)
        packed0 = _pack_state(state0, dtype)
        qh, kh = _to_bhtd(q, dtype), _to_bhtd(k, dtype)
        v1 = _augment(_to_bhtd(v, dtype), mask)
        if impl == "reference":
            # the plain quadratic form: causal scores plus encoder scores masked to the prefix
            phi_q = taylor_feature_map(qh)
            ke, ve1 = _to_bhtd(k_enc, dtype), _augment(_to_bhtd(v_enc, dtype), in_prefix)
            enc_scores = phi_q @ taylor_feature_map(ke).transpose(-1, -2)
            o1, state = _causal_reference(qh, kh, v1, packed0)
            o1 = o1 + enc_scores @ ve1
            state = state + taylor_feature_map(ke).transpose(-1, -2) @ ve1
        else:
            # the encoder sum runs over the positions up to the last prefix token of any sequence
            hit = in_prefix.any(dim=0).nonzero()
            cut = int(hit[-1]) + 1 if hit.numel() else 0
            ke = _to_bhtd(k_enc[:, :cut], dtype)
            ve1 = _augment(_to_bhtd(v_enc[:, :cut], dtype), in_prefix[:, :cut])
            if impl == "chunk":
                o1, state = _causal_chunk(qh, kh, v1, packed0, (ke, ve1) if cut else None)
            else:
                enc = taylor_feature_map(ke).transpose(-1, -2) @ ve1
                o1, state = _causal_recurrent(qh, kh, v1, enc if packed0 is None else packed0 + enc)
    return _normalise(o1, eps, v.dtype), (_unpack_state(state) if output_final_state else None)
