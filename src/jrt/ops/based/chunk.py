"""The chunked form: linear in T, differentiable. See :mod:`jrt.ops.based` for the layout.

Per chunk of ``C`` tokens: the intra-chunk term ``tril(1 + s + s^2/2) @ [v, 1]`` with ``s = q.k / sqrt(F)``
(the kernel applied to the scores directly, no feature map), and the inter-chunk term, the state of every
earlier token read by the query features. The running state lives in the compressed feature space of
:func:`jrt.ops.taylor_feature_map` (``Dc = 1+F+F(F+1)/2`` rows), scaled row-wise by the map's weights ``w``
(:func:`jrt.ops.feature_map.monomial_weights`): ``U = w * S_c``. Then

* reading is ``phi_c(q) . S_c = monomials(q) . U``: the query features need no scaling;
* writing is ``w * phi_c(k) = halve_squares(monomials(k / sqrt(F)))``: the key features are those of the
  scaled keys (which the intra-chunk scores use too), with the square rows ``k_a^2`` halved;
* states come in and go out in the full map's space through :func:`jrt.ops.compress_state` /
  :func:`jrt.ops.expand_state`.

The work runs over blocks of ``(sequence, head)`` pairs and one segment of at most ``SEGMENT_SIZE`` tokens at a
time, vectorised over the chunks of the segment, so the working memory is bounded by the segment whatever B, H
and T are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jrt.ops.feature_map import compress_state, expand_state, feature_dim, monomial_weights, monomials

#: Chunk length ``C``.
CHUNK_SIZE = 64
#: Tokens per vectorised segment (bounds the working memory to ``O(segment * Dc)``).
SEGMENT_SIZE = 8192


def halve_squares(f: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``[Dc, 1]``: 1/2 on the rows of the squares ``x_a^2`` of :func:`monomials`, 1 elsewhere."""
    rows, cols = torch.triu_indices(f, f)
    w = torch.ones(feature_dim(f, compressed=True), dtype=dtype, device=device)
    w[1 + f :][rows == cols] = 0.5
    return w.unsqueeze(-1)


def to_internal(state: torch.Tensor, f: int) -> torch.Tensor:
    """Full-map state ``[..., D, X]`` -> the running state ``U = w * compress_state(S)`` ``[..., Dc, X]``."""
    return compress_state(state, f) * monomial_weights(f, state.dtype, state.device).unsqueeze(-1)


def to_full(internal: torch.Tensor, f: int) -> torch.Tensor:
    """Inverse of :func:`to_internal`: ``[..., Dc, X]`` -> ``[..., D, X]`` (the quadratic block symmetric)."""
    return expand_state(internal / monomial_weights(f, internal.dtype, internal.device).unsqueeze(-1), f)


def encoder_state(k_enc: torch.Tensor, v1_enc: torch.Tensor) -> torch.Tensor:
    """The running-state form of ``sum_j phi(ke_j) [ve_j, 1]^T``: ``[..., Dc, Dv+1]``.

    ``k_enc [..., L, F]`` and ``v1_enc [..., L, Dv+1]`` (rows outside the prefix zeroed); summed over segments
    so that the features stay small.
    """
    f = k_enc.shape[-1]
    k_enc = k_enc * f**-0.5
    total = None
    for start in range(0, k_enc.shape[-2], SEGMENT_SIZE):
        part = monomials(k_enc[..., start : start + SEGMENT_SIZE, :].contiguous()).transpose(-1, -2)
        part = part @ v1_enc[..., start : start + SEGMENT_SIZE, :]
        total = part if total is None else total + part
    return total * halve_squares(f, total.dtype, total.device)


@dataclass
class Blocks:
    """The inputs cut into chunks and the work cut into blocks (shared by both chunked forms).

    ``q, k, v1``: ``[BH, n, C, *]`` contiguous (``k`` scaled by ``1/sqrt(F)``, the time padded to ``n * C`` with
    zero rows); ``states``: the initial running state ``[BH, Dc, Dv+1]``; ``enc_k, enc_v1``: ``[BH, L, *]`` or
    None; ``spans``: blocks ``(g0, g1)`` of (sequence, head) rows; ``per_segment``: chunks per segment.
    """

    shape: tuple[int, int, int]  # B, H, T
    q: torch.Tensor
    k: torch.Tensor
    v1: torch.Tensor
    states: torch.Tensor
    enc_k: torch.Tensor | None
    enc_v1: torch.Tensor | None
    spans: list[tuple[int, int]]
    per_segment: int
    halving: torch.Tensor

    @property
    def n_chunks(self) -> int:
        return self.q.shape[1]

    def start_state(self, g0: int, g1: int) -> torch.Tensor:
        """The running state of rows ``g0:g1`` before the first token: initial state plus encoder state."""
        state = self.states[g0:g1]
        if self.enc_k is not None:
            state = state + encoder_state(self.enc_k[g0:g1], self.enc_v1[g0:g1])
        return state

    def finish(self, outputs: torch.Tensor, finals: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``outputs [BH, n, C, Dv+1]`` and per-block final states -> ``(o1 [B, H, T, Dv+1], state [B, H, D, Dv+1])``.
        """
        b, h, t = self.shape
        f, dv1 = self.q.shape[-1], self.v1.shape[-1]
        o1 = outputs.reshape(b, h, -1, dv1)[:, :, :t]
        return o1, to_full(torch.cat(finals), f).reshape(b, h, -1, dv1)


def split(q, k, v1, state0, encoder, chunk_size: int | None = None, segment_size: int | None = None) -> Blocks:
    """Cut ``[B, H, T, *]`` inputs into chunks and the work into blocks of G (sequence, head) rows x n chunks:
    whole sequences of several heads when they are short, one head and a segment of time when they are long."""
    b, h, t, f = q.shape
    c = min(chunk_size or CHUNK_SIZE, t)
    pad = (-t) % c
    if pad:  # zero rows of [v, 1] add nothing to any sum; the padded outputs are cut off in finish()
        q, k, v1 = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v1))
    n_chunks, bh, dv1 = (t + pad) // c, b * h, v1.shape[-1]
    if state0 is not None:
        states = to_internal(state0.reshape(bh, -1, dv1), f)
    else:
        states = q.new_zeros(bh, feature_dim(f, compressed=True), dv1)
    enc_k = enc_v1 = None
    if encoder is not None:
        enc_k, enc_v1 = (x.reshape(bh, x.shape[-2], x.shape[-1]) for x in encoder)
    budget = max(1, (segment_size or SEGMENT_SIZE) // c)
    per_segment = min(n_chunks, budget)
    group = max(1, budget // n_chunks) if per_segment == n_chunks else 1
    return Blocks(
        shape=(b, h, t),
        q=q.reshape(bh, n_chunks, c, f).contiguous(),
        k=(k * f**-0.5).reshape(bh, n_chunks, c, f).contiguous(),
        v1=v1.reshape(bh, n_chunks, c, dv1).contiguous(),
        states=states, enc_k=enc_k, enc_v1=enc_v1,
        spans=[(g0, min(g0 + group, bh)) for g0 in range(0, bh, group)],
        per_segment=per_segment,
        halving=halve_squares(f, q.dtype, q.device),
    )


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v1: torch.Tensor,
    state0: torch.Tensor | None = None,
    encoder: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form with out-of-place operations only (autograd records it). Per segment: intra-chunk
    scores, per-chunk states, their exclusive prefix sums (``cumsum``), and the read of those sums."""
    blocks = split(q, k, v1, state0, encoder)
    rows, finals = [], []
    for g0, g1 in blocks.spans:
        state = blocks.start_state(g0, g1)  # [G, Dc, Dv+1]
        pieces = []
        for start in range(0, blocks.n_chunks, blocks.per_segment):
            stop = min(start + blocks.per_segment, blocks.n_chunks)
            qc, kc, vc = (x[g0:g1, start:stop] for x in (blocks.q, blocks.k, blocks.v1))  # [G, n, C, *]
            scores = qc @ kc.transpose(-1, -2)
            scores = torch.addcmul(scores, scores, scores, value=0.5).add_(1.0).tril_()
            chunk_states = (monomials(kc).transpose(-1, -2) @ vc) * blocks.halving  # [G, n, Dc, Dv+1]
            before = torch.cat([state.unsqueeze(1), chunk_states[:, :-1]], dim=1).cumsum(dim=1)
            state = before[:, -1] + chunk_states[:, -1]
            pieces.append(scores @ vc + monomials(qc) @ before)
        rows.append(torch.cat(pieces, dim=1))
        finals.append(state)
    return blocks.finish(torch.cat(rows, dim=0), finals)
