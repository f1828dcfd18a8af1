"""The chunked form: linear in T, differentiable. See :mod:`jrt.ops.based` for the layout.

Per chunk of ``C`` tokens: the intra-chunk term ``tril(1 + s + s^2/2) @ [v, 1]`` with ``s = q.k / sqrt(F)``
(the kernel applied to the scores directly, no feature map), and the inter-chunk term, the state of every
earlier token read by the query features. The running state lives in the compressed feature space of
:func:`jrt.ops.taylor_feature_map` (``Dc = 1+F+F(F+1)/2`` rows), scaled row-wise by the map's weights ``w``
(:func:`jrt.ops.feature_map.monomial_weights`) and with its rows in the *diagonal order* of :func:`features`:
``U = P (w * S_c)`` (``P`` the row permutation of :func:`diagonal_order`). Then

* reading is ``phi_c(q) . S_c = features(q) . U``: the query features need no scaling;
* writing is ``w * phi_c(k) = features(k / sqrt(F), halve=True)``: the key features are those of the scaled
  keys (which the intra-chunk scores use too), with the squares ``k_a^2`` halved;
* states come in and go out in the full map's space through :func:`to_internal` / :func:`to_full`.

The diagonal order puts the squares in one block of ``F`` columns and builds every block with one product of
two slices of ``x``, written in place into one buffer; its backward (:class:`_Features`) is the same ``F``
products. The exclusive prefix sum of the chunk states is a loop of in-place adds forwards and backwards
(:class:`_ExclusivePrefix`; ``cumsum`` over a leading dimension is much slower on CPUs).

The work runs over blocks of ``(sequence, head)`` pairs and one segment of at most ``SEGMENT_SIZE`` tokens at a
time, vectorised over the chunks of the segment, so the working memory is bounded by the segment whatever B, H
and T are.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from jrt.ops.feature_map import compress_state, expand_state, feature_dim, monomial_weights

#: Chunk length ``C``.
CHUNK_SIZE = 64
#: Tokens per vectorised segment (bounds the working memory to ``O(segment * Dc)``).
SEGMENT_SIZE = 8192


@functools.lru_cache(maxsize=32)
def diagonal_order(f: int) -> torch.Tensor:
    """``[Dc]`` long: row ``i`` of the diagonal order is row ``diagonal_order(f)[i]`` of the compressed map's
    order (:func:`jrt.ops.feature_map.monomials`: ``1``, ``x_a``, then ``x_a x_b`` for ``a <= b`` row-major).

    The diagonal order is ``1``, ``x_a``, then ``x_a x_(a+d)`` for ``d = 0 .. F-1``, ``a = 0 .. F-1-d``.
    """
    with torch.inference_mode(False):  # cached: usable by autograd whatever mode the first call ran in
        rows, cols = torch.triu_indices(f, f)
        position = {(int(a), int(b)): 1 + f + i for i, (a, b) in enumerate(zip(rows, cols))}
        order = list(range(1 + f)) + [position[(a, a + d)] for d in range(f) for a in range(f - d)]
        return torch.tensor(order, dtype=torch.long)


def _fill_features(xt: torch.Tensor, out: torch.Tensor, halve: bool) -> torch.Tensor:
    f = xt.shape[-2]
    out[..., 0, :].fill_(1.0)
    out[..., 1 : 1 + f, :].copy_(xt)
    start = 1 + f
    for d in range(f):  # rows x_a x_(a+d), a = 0 .. F-1-d: one product of two slices, contiguous inner rows
        torch.mul(xt[..., : f - d, :], xt[..., d:, :], out=out[..., start : start + f - d, :])
        start += f - d
    if halve:
        out[..., 1 + f : 1 + 2 * f, :].mul_(0.5)
    return out


class _Features(torch.autograd.Function):
    """:func:`features` with its backward written as the same ``F`` slice products."""

    @staticmethod
    def forward(ctx, xt: torch.Tensor, halve: bool) -> torch.Tensor:
        ctx.save_for_backward(xt)
        ctx.halve = halve
        return _fill_features(xt, _new_features(xt), halve)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (xt,) = ctx.saved_tensors
        f = xt.shape[-2]
        grad = grad.contiguous()
        dxt = grad[..., 1 : 1 + f, :].clone()
        dxt.addcmul_(grad[..., 1 + f : 1 + 2 * f, :], xt, value=1.0 if ctx.halve else 2.0)
        start = 1 + 2 * f
        for d in range(1, f):
            g = grad[..., start : start + f - d, :]
            dxt[..., : f - d, :].addcmul_(g, xt[..., d:, :])
            dxt[..., d:, :].addcmul_(g, xt[..., : f - d, :])
            start += f - d
        return dxt, None


def _new_features(xt: torch.Tensor) -> torch.Tensor:
    return xt.new_empty(*xt.shape[:-2], feature_dim(xt.shape[-2], compressed=True), xt.shape[-1])


def features(xt: torch.Tensor, halve: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Feature-major monomials: ``xt [..., F, N] -> [..., Dc, N]``, the rows ``1, x_a, x_a x_(a+d)`` in the
    diagonal order of :func:`diagonal_order`, unscaled, for each of the ``N`` vectors ``xt[..., :, i]``.

    ``halve`` halves the squares ``x_a^2`` (the first ``F`` quadratic rows). ``out`` (``[..., Dc, N]``, no
    autograd) receives them in place. Feature-major, every row block is one product of two slices of ``xt``
    over contiguous memory. Differentiable through :class:`_Features` when ``xt`` requires a gradient."""
    if out is None:
        if torch.is_grad_enabled() and xt.requires_grad:
            return _Features.apply(xt, halve)
        out = _new_features(xt)
    return _fill_features(xt, out, halve)


class _ExclusivePrefix(torch.autograd.Function):
    """``(start [G, Dc, X], chunk_states [G, n, Dc, X]) -> (before [G, n, Dc, X], final [G, Dc, X])`` with
    ``before[:, j] = start + sum_(i<j) chunk_states[:, i]`` and ``final = start + sum_i chunk_states[:, i]``:
    loops of in-place adds, forwards and backwards."""

    @staticmethod
    def forward(ctx, start: torch.Tensor, chunk_states: torch.Tensor):
        return exclusive_prefix(start, chunk_states)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_before: torch.Tensor, grad_final: torch.Tensor):
        n = grad_before.shape[1]
        grad_states = torch.empty_like(grad_before)
        grad_states[:, n - 1].copy_(grad_final)
        for j in range(n - 1, 0, -1):
            torch.add(grad_states[:, j], grad_before[:, j], out=grad_states[:, j - 1])
        return grad_states[:, 0] + grad_before[:, 0], grad_states


def exclusive_prefix(
    start: torch.Tensor, chunk_states: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :class:`_ExclusivePrefix` (which this calls when autograd needs it); ``out`` receives ``before``."""
    if out is None:
        if torch.is_grad_enabled() and (start.requires_grad or chunk_states.requires_grad):
            return _ExclusivePrefix.apply(start, chunk_states)
        out = torch.empty_like(chunk_states)
    n = chunk_states.shape[1]
    out[:, 0].copy_(start)
    for j in range(1, n):
        torch.add(out[:, j - 1], chunk_states[:, j - 1], out=out[:, j])
    return out, out[:, n - 1] + chunk_states[:, n - 1]


class _Divide(torch.autograd.Function):
    """:func:`divide` with a backward of a few fused passes (autograd's would slice the numerator and the
    denominator out of ``o1`` into two zero-filled full-size gradients)."""

    @staticmethod
    def forward(ctx, o1: torch.Tensor, eps: float) -> torch.Tensor:
        o1 = o1.transpose(1, 2)
        recip = torch.reciprocal(o1[..., -1:] + eps)
        o = torch.mul(o1[..., :-1], recip, out=o1.new_empty(*o1.shape[:-1], o1.shape[-1] - 1))
        ctx.save_for_backward(o, recip)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        o, recip = ctx.saved_tensors
        grad_o1 = grad.new_empty(*grad.shape[:-1], grad.shape[-1] + 1)  # [B, T, H, Dv+1]
        torch.mul(grad, recip, out=grad_o1[..., :-1])
        torch.sum(grad_o1[..., :-1] * o, dim=-1, keepdim=True, out=grad_o1[..., -1:]).neg_()
        return grad_o1.transpose(1, 2), None


def divide(o1: torch.Tensor, eps: float) -> torch.Tensor:
    """Numerator over denominator: ``o1 [B, H, T, Dv+1] -> o [B, T, H, Dv]`` (contiguous),
    ``o = o1[..., :-1] / (o1[..., -1:] + eps)``; differentiable (:class:`_Divide`)."""
    if torch.is_grad_enabled() and o1.requires_grad:
        return _Divide.apply(o1, eps)
    o1 = o1.transpose(1, 2)
    return torch.div(o1[..., :-1], o1[..., -1:] + eps, out=o1.new_empty(*o1.shape[:-1], o1.shape[-1] - 1))


def to_internal(state: torch.Tensor, f: int) -> torch.Tensor:
    """Full-map state ``[..., D, X]`` -> the running state ``U = P (w * compress_state(S))`` ``[..., Dc, X]``."""
    internal = compress_state(state, f) * monomial_weights(f, state.dtype, state.device).unsqueeze(-1)
    return internal[..., diagonal_order(f).to(state.device), :]


def to_full(internal: torch.Tensor, f: int) -> torch.Tensor:
    """Inverse of :func:`to_internal`: ``[..., Dc, X]`` -> ``[..., D, X]`` (the quadratic block symmetric)."""
    compressed = internal[..., torch.argsort(diagonal_order(f)).to(internal.device), :]
    return expand_state(compressed / monomial_weights(f, internal.dtype, internal.device).unsqueeze(-1), f)


def encoder_state(k_enc_t: torch.Tensor, v1_enc: torch.Tensor) -> torch.Tensor:
    """The running-state form of ``sum_j phi(ke_j) [ve_j, 1]^T``: ``[..., Dc, Dv+1]``.

    ``k_enc_t [..., F, L]`` (feature-major) and ``v1_enc [..., L, Dv+1]`` (rows outside the prefix zeroed);
    summed over segments of ``SEGMENT_SIZE`` tokens (all rows together) so that the features stay small.
    """
    f = k_enc_t.shape[-2]
    k_enc_t = k_enc_t * f**-0.5
    step = max(1, SEGMENT_SIZE // max(1, k_enc_t[..., 0, 0].numel()))  # tokens per row: SEGMENT_SIZE in all
    total = None
    for kt, v1 in zip(k_enc_t.split(step, dim=-1), v1_enc.split(step, dim=-2)):  # split: one cat in backward
        part = features(kt, halve=True) @ v1
        total = part if total is None else total + part
    return total


@dataclass
class Blocks:
    """The inputs cut into chunks and the work cut into blocks (shared by both chunked forms).

    ``qt, kt``: ``[BH, n, F, C]`` contiguous, feature-major (``k`` scaled by ``1/sqrt(F)``); ``v1``: the input
    ``[B, H, n*C, Dv+1]`` (the time padded to ``n * C`` with zero rows), read through :meth:`values`;
    ``v1_rows``: ``[BH, n, C, Dv+1]`` contiguous when blocks hold whole sequences, else None; ``states``: the
    initial running state ``[BH, Dc, Dv+1]``; ``enc_kt, enc_v1``: ``[BH, F, L]`` and ``[BH, L, Dv+1]`` or None;
    ``spans``: blocks ``(g0, g1)`` of (sequence, head) rows; ``per_segment``: chunks per segment; ``budget``:
    chunks of one row in ``SEGMENT_SIZE`` tokens.
    """

    shape: tuple[int, int, int]  # B, H, T
    qt: torch.Tensor
    kt: torch.Tensor
    v1: torch.Tensor
    v1_rows: torch.Tensor | None
    states: torch.Tensor
    enc_kt: torch.Tensor | None
    enc_v1: torch.Tensor | None
    spans: list[tuple[int, int]]
    per_segment: int
    budget: int

    @property
    def n_chunks(self) -> int:
        return self.qt.shape[1]

    def values(self, g0: int, g1: int, start: int, stop: int) -> torch.Tensor:
        """``[v, 1]`` of rows ``g0:g1`` and chunks ``start:stop``: ``[G*n, C, Dv+1]`` (rows of one sequence
        unless ``v1_rows`` is set)."""
        c, dv1 = self.qt.shape[-1], self.v1.shape[-1]
        if self.v1_rows is not None:
            return self.v1_rows[g0:g1, start:stop].reshape(-1, c, dv1)
        b, h0 = divmod(g0, self.shape[1])
        return self.v1[b, h0 : h0 + g1 - g0, start * c : stop * c].reshape(-1, c, dv1)

    def start_state(self, g0: int, g1: int) -> torch.Tensor:
        """The running state of rows ``g0:g1`` before the first token: initial state plus encoder state."""
        state = self.states[g0:g1]
        if self.enc_kt is not None:
            state = state + encoder_state(self.enc_kt[g0:g1], self.enc_v1[g0:g1])
        return state

    def final_state(self, finals: list[torch.Tensor]) -> torch.Tensor:
        """Per-block final running states -> ``[B, H, D, Dv+1]`` in the full map's space."""
        b, h, _ = self.shape
        return to_full(torch.cat(finals), self.qt.shape[-2]).reshape(b, h, -1, self.v1.shape[-1])


def split(q, k, v1, state0, encoder, chunk_size: int | None = None, segment_size: int | None = None) -> Blocks:
    """Cut ``[B, H, T, *]`` inputs into chunks and the work into blocks of G (sequence, head) rows x n chunks:
    whole sequences of several heads when they are short; when they are long, the heads of one sequence (as many
    blocks as CPU threads) and a segment of time (``G * n * C <= segment_size`` tokens)."""
    b, h, t, f = q.shape
    c = min(chunk_size or CHUNK_SIZE, t)
    pad = (-t) % c
    if pad:  # zero rows of [v, 1] add nothing to any sum; the padded outputs are cut off at the end
        q, k, v1 = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v1))
    n_chunks, bh, dv1 = (t + pad) // c, b * h, v1.shape[-1]
    if state0 is not None:
        states = to_internal(state0.reshape(bh, -1, dv1), f)
    else:
        states = q.new_zeros(bh, feature_dim(f, compressed=True), dv1)
    enc_kt = enc_v1 = None
    if encoder is not None:
        enc_kt = encoder[0].transpose(-1, -2).reshape(bh, f, -1)
        enc_v1 = encoder[1].reshape(bh, -1, dv1)
    budget = max(1, (segment_size or SEGMENT_SIZE) // c)  # chunks of one row per segment
    if n_chunks <= budget:  # short sequences: blocks of several whole rows, one segment each
        group, per_segment = max(1, budget // n_chunks), n_chunks
        spans = [(g0, min(g0 + group, bh)) for g0 in range(0, bh, group)]
    else:  # long ones: blocks of the heads of one sequence (one block per thread), segments of time
        threads = torch.get_num_threads() if q.device.type == "cpu" else 1
        group = max(1, min(h, budget, -(-h // threads)))
        per_segment = max(1, budget // group)
        spans = [(i * h + h0, i * h + min(h0 + group, h)) for i in range(b) for h0 in range(0, h, group)]

    def feature_major(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:  # one pass: copy (and scale)
        view = x.unflatten(2, (n_chunks, c)).transpose(-1, -2)
        if torch.is_grad_enabled() and x.requires_grad:  # out= does not record for autograd
            return (view * scale).reshape(bh, n_chunks, f, c)
        return torch.mul(view, scale, out=x.new_empty(view.shape)).view(bh, n_chunks, f, c)

    return Blocks(
        shape=(b, h, t),
        qt=feature_major(q),
        kt=feature_major(k, f**-0.5),
        v1=v1,
        v1_rows=v1.reshape(bh, n_chunks, c, dv1) if per_segment == n_chunks and group > 1 else None,
        states=states, enc_kt=enc_kt, enc_v1=enc_v1, spans=spans, per_segment=per_segment, budget=budget,
    )


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v1: torch.Tensor,
    state0: torch.Tensor | None = None,
    encoder: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form with out-of-place operations only (autograd records it). Per segment: intra-chunk
    scores, per-chunk states, their exclusive prefix sums (:func:`exclusive_prefix`), and the read of those
    sums."""
    blocks = split(q, k, v1, state0, encoder)
    (b, h, t), n_chunks = blocks.shape, blocks.n_chunks
    c, dv1 = blocks.qt.shape[-1], v1.shape[-1]
    # one block of every row (autograd keeps O(T) anyway); segments cut with split(), whose backward is one cat
    per_segment = min(n_chunks, max(1, blocks.budget // (b * h)))
    state = blocks.start_state(0, b * h)  # [BH, Dc, Dv+1]
    pieces = []
    v_rows = blocks.v1.reshape(b * h, n_chunks, c, dv1)
    for qt, kt, vc in zip(*(x.split(per_segment, dim=1) for x in (blocks.qt, blocks.kt, v_rows))):
        scores = qt.transpose(-1, -2) @ kt  # [BH, n, C, C]
        scores = torch.addcmul(scores, scores, scores, value=0.5).add_(1.0).tril_()
        chunk_states = features(kt, halve=True) @ vc  # [BH, n, Dc, Dv+1]
        before, state = exclusive_prefix(state, chunk_states)
        # the read as (before^T fq)^T: the gradient of the features then comes out of a product contiguous
        read = (before.transpose(-1, -2) @ features(qt)).transpose(-1, -2)
        pieces.append(scores @ vc + read)
    o1 = torch.cat(pieces, dim=1).reshape(b, h, -1, dv1)[:, :, :t]
    return o1, blocks.final_state([state])
