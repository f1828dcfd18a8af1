"""Sliding-window softmax attention with rotary position embedding (JRT-RNN's SWA layers).

Query ``i`` attends to keys ``j`` with ``i - window <= j <= i`` (``window`` tokens back plus the current
one). Rotary embedding (GPT-NeoX / flash-attn non-interleaved layout, on the full head dim) is applied to
queries and keys at their positions among the real tokens, so left padding does not change the result.

Forms: ``reference`` (full ``T x T`` scores with a band mask), ``chunk`` (blocked: each block of queries
sees its own and the previous block of keys, cost ``O(T * window)``) and a decode step on a ring buffer of
``window + 1`` keys/values (:class:`RingBuffer`, :func:`sliding_window_decode_step`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jrt.ops.common import check_impl, check_mask, check_qkv, drop_rows

DEFAULT_ROTARY_BASE = 10000.0


def positions_from_mask(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """``[B, T]`` positions among real tokens (padding gets position 0)."""
    if attention_mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def check_rotary_base(base: object) -> float | None:
    """None (no rotary embedding) or a finite number > 0."""
    if base is None:
        return None
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 0:
        raise ValueError(f"rotary_base must be a finite number > 0 or None, got {base!r}")
    return float(base)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float = DEFAULT_ROTARY_BASE) -> torch.Tensor:
    """Rotate ``x [B, T, H, Dh]`` (Dh even) by the angles of ``positions [B, T]`` (half-split layout)."""
    check_rotary_base(base)
    dh = x.shape[-1]
    if dh % 2:
        raise ValueError(f"rotary embedding needs an even head dimension, got {dh}")
    inv_freq = 1.0 / (base ** (torch.arange(0, dh, 2, device=x.device, dtype=torch.float64) / dh))
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # [B, T, Dh/2]
    cos = angles.cos().to(torch.float32 if x.dtype != torch.float64 else torch.float64).unsqueeze(2)
    sin = angles.sin().to(cos.dtype).unsqueeze(2)
    xf = x.to(cos.dtype)
    x1, x2 = xf[..., : dh // 2], xf[..., dh // 2 :]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def _band(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Allowed (query, key) pairs from absolute indices: ``q - window <= k <= q``."""
    diff = q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)
    return (diff >= 0) & (diff <= window)


def _attend(q, k, v, allowed, scale):
    """Softmax attention on ``[..., Tq, D]`` x ``[..., Tk, D]`` with a boolean mask ``[..., Tq, Tk]``."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    attention_mask: torch.Tensor | None = None,
    rotary_base: float | None = DEFAULT_ROTARY_BASE,
    impl: str = "auto",
) -> torch.Tensor:
    """Causal softmax attention over the last ``window`` tokens plus the current one.

    Args:
        q, k, v: ``[B, T, H, Dh]`` (projections before rotary embedding; ``k``, ``v`` may have ``Hkv`` heads,
            ``H`` a multiple of ``Hkv``: grouped-query heads).
        window: how many tokens back each query sees (>= 0).
        attention_mask: ``[B, T]``, 1 = token, 0 = padding; padded keys are never attended to (their keys and
            values are replaced by zeros first, so that a NaN or inf there cannot leak).
        rotary_base: base of the rotary embedding (> 0), or None to apply none.
        impl: ``"reference"``, ``"chunk"`` (blocked, ``O(T * window)``) or ``"auto"`` (= chunk).

    Returns:
        ``o [B, T, H, Dh]`` in ``v``'s dtype.
    """
    groups = check_qkv(q, k, v, grouped=True)
    if groups > 1:  # grouped-query heads: each key/value head serves its group of query heads
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    check_impl(impl, ("auto", "reference", "chunk"))
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    rotary_base = check_rotary_base(rotary_base)
    b, t, h, dh = q.shape
    mask = check_mask(attention_mask, b, t, q.device)
    k, v = drop_rows(k, mask), drop_rows(v, mask)
    if rotary_base is not None:
        pos = positions_from_mask(mask, b, t, q.device)
        q, k = apply_rotary(q, pos, rotary_base), apply_rotary(k, pos, rotary_base)
    key_ok = mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=q.device)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh, kh, vh = (x.to(dtype).transpose(1, 2) for x in (q, k, v))  # [B, H, T, Dh]
    scale = 1.0 / math.sqrt(dh)
    if impl == "reference" or t <= max(window, 1) * 2:
        idx = torch.arange(t, device=q.device)
        allowed = _band(idx, idx, window) & (key_ok[:, None, :] | torch.eye(t, dtype=torch.bool, device=q.device))
        o = _attend(qh, kh, vh, allowed[:, None], scale)
        return o.transpose(1, 2).to(v.dtype)
    # blocked: block size c >= window, so block n needs only blocks n-1 and n
    c = max(window, 16)
    pad = (-t) % c
    n = (t + pad) // c
    qh, kh, vh = (F.pad(x, (0, 0, 0, pad)) for x in (qh, kh, vh))
    key_ok = F.pad(key_ok, (0, pad), value=False)

    def with_previous(x):  # [B, H, n*c, D] -> [B, H, n, 2c, D]
        blocks = x.unflatten(2, (n, c))
        previous = torch.cat([torch.zeros_like(blocks[:, :, :1]), blocks[:, :, :-1]], dim=2)
        return torch.cat([previous, blocks], dim=3)

    kk, vv = with_previous(kh), with_previous(vh)
    ok_blocks = key_ok.unflatten(1, (n, c))
    ok_prev = torch.cat([torch.zeros_like(ok_blocks[:, :1]), ok_blocks[:, :-1]], dim=1)
    key_valid = torch.cat([ok_prev, ok_blocks], dim=2)  # [B, n, 2c]
    q_idx = torch.arange(c, device=q.device) + c
    k_idx = torch.arange(2 * c, device=q.device)
    band = _band(q_idx, k_idx, window)  # [c, 2c]
    diag = q_idx.unsqueeze(-1) == k_idx.unsqueeze(-2)
    allowed = band & (key_valid.unsqueeze(-2) | diag)  # [B, n, c, 2c]
    o = _attend(qh.unflatten(2, (n, c)), kk, vv, allowed[:, None], scale)
    return o.flatten(2, 3)[:, :, :t].transpose(1, 2).to(v.dtype)


@dataclass
class RingBuffer:
    """The decoding state of one sliding-window layer: the last ``window + 1`` keys (rotated) and values.

    ``keys, values: [B, S, H, Dh]`` with ``S = window + 1``; ``positions: [B, S]`` the position of each slot
    (-1 = empty); ``length: [B]`` real tokens seen so far (the position of the next token).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    length: torch.Tensor

    @classmethod
    def empty(cls, batch: int, window: int, heads: int, head_dim: int, dtype, device) -> RingBuffer:
        slots = window + 1
        return cls(
            keys=torch.zeros(batch, slots, heads, head_dim, dtype=dtype, device=device),
            values=torch.zeros(batch, slots, heads, head_dim, dtype=dtype, device=device),
            positions=torch.full((batch, slots), -1, dtype=torch.long, device=device),
            length=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def window(self) -> int:
        return self.keys.shape[1] - 1

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.keys, self.values, self.positions, self.length))

    def write(
        self, keys: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> RingBuffer:
        """Append ``keys`` (already rotated) and ``values`` ``[B, T, H, Dh]``; pads (mask 0) are skipped."""
        b, t = keys.shape[:2]
        mask = attention_mask.bool() if attention_mask is not None else torch.ones(b, t, dtype=torch.bool,
                                                                                     device=keys.device)
        pos = self.length[:, None] + mask.long().cumsum(-1) - 1  # position of each real token
        new_length = self.length + mask.long().sum(-1)
        keep = mask & (pos >= (new_length[:, None] - self.keys.shape[1]))
        bi, ti = keep.nonzero(as_tuple=True)
        slot = pos[bi, ti] % self.keys.shape[1]
        self.keys[bi, slot] = keys[bi, ti].to(self.keys.dtype)
        self.values[bi, slot] = values[bi, ti].to(self.values.dtype)
        self.positions[bi, slot] = pos[bi, ti]
        self.length = new_length
        return self

    def reorder(self, index: torch.Tensor) -> RingBuffer:
        """Select batch rows (beam search / generation)."""
        return RingBuffer(self.keys[index], self.values[index], self.positions[index], self.length[index])


def sliding_window_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: RingBuffer,
    *,
    rotary_base: float | None = DEFAULT_ROTARY_BASE,
) -> torch.Tensor:
    """One decoding step: ``q, k, v [B, 1, H, Dh]`` for the next token of every sequence.

    Rotates ``q, k`` at position ``cache.length``, writes ``k, v`` into the ring buffer (in place) and
    attends over the (at most ``window + 1``) valid slots. Returns ``o [B, 1, H, Dh]`` in ``v``'s dtype.
    Grouped-query heads: ``k, v`` (and the ring buffer) may have ``Hkv`` heads, ``H`` a multiple of ``Hkv``; query
    head ``h`` reads key/value head ``h // (H // Hkv)``.
    """
    groups = check_qkv(q, k, v, grouped=True)
    if q.shape[1] != 1:
        raise ValueError(f"sliding_window_decode_step takes one token per sequence, got T={q.shape[1]}")
    rotary_base = check_rotary_base(rotary_base)
    pos = cache.length[:, None]
    if rotary_base is not None:
        q, k = apply_rotary(q, pos, rotary_base), apply_rotary(k, pos, rotary_base)
    cache.write(k, v)
    valid = (cache.positions >= 0) & (cache.positions >= pos - cache.window)  # [B, S]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, _, h, dh = q.shape
    qh = q.to(dtype).view(b, h // groups, groups, dh)  # [B, Hkv, G, Dh]: the group's queries attend together
    kh, vh = cache.keys.to(dtype).transpose(1, 2), cache.values.to(dtype).transpose(1, 2)
    o = _attend(qh, kh, vh, valid[:, None, None, :], 1.0 / math.sqrt(dh))
    return o.reshape(b, 1, h, -1).to(v.dtype)
