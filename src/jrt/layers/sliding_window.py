"""Sliding-window (and full causal) softmax attention with rotary embedding, as a layer.

With a window (:class:`SlidingWindowAttention`) the decoding state is a :class:`jrt.ops.RingBuffer` of
``window + 1`` rotated keys/values (constant in the context length); without one (:class:`CausalAttention`, the
Transformer baseline) the layer is full causal softmax attention and its state is a growing :class:`KVCache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from jrt.layers._checks import check_hidden
from jrt.ops import (
    RingBuffer,
    apply_rotary,
    positions_from_mask,
    sliding_window_attention,
    sliding_window_decode_step,
)
from jrt.ops.common import check_mask
from jrt.ops.sliding_window import check_rotary_base

if TYPE_CHECKING:  # any config object with the fields listed in the docstrings
    from transformers import PretrainedConfig


@dataclass
class KVCache:
    """Growing key/value cache of full attention: ``keys, values [B, S, H, Dh]`` (keys rotated),
    ``positions [B, S]`` (-1 = padding slot), ``length [B]`` real tokens seen so far."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    length: torch.Tensor

    @classmethod
    def empty(cls, batch: int, heads: int, head_dim: int, dtype, device) -> KVCache:
        return cls(
            keys=torch.zeros(batch, 0, heads, head_dim, dtype=dtype, device=device),
            values=torch.zeros(batch, 0, heads, head_dim, dtype=dtype, device=device),
            positions=torch.zeros(batch, 0, dtype=torch.long, device=device),
            length=torch.zeros(batch, dtype=torch.long, device=device),
        )

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.keys, self.values, self.positions, self.length))

    def write(self, keys: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> KVCache:
        """Append rotated ``keys`` and ``values [B, T, H, Dh]``; padded positions get slot position -1."""
        b, t = keys.shape[:2]
        mask = (
            attention_mask.bool() if attention_mask is not None
            else torch.ones(b, t, dtype=torch.bool, device=keys.device)
        )
        pos = self.length[:, None] + mask.long().cumsum(-1) - 1
        self.keys = torch.cat([self.keys, keys.to(self.keys.dtype)], dim=1)
        self.values = torch.cat([self.values, values.to(self.values.dtype)], dim=1)
        self.positions = torch.cat([self.positions, torch.where(mask, pos, torch.full_like(pos, -1))], dim=1)
        self.length = self.length + mask.long().sum(-1)
        return self

    def reorder(self, index: torch.Tensor) -> KVCache:
        return KVCache(self.keys[index], self.values[index], self.positions[index], self.length[index])


@dataclass
class SlidingWindowState:
    """Decoding state of one :class:`SlidingWindowAttention`: a ring buffer (window) or a KV cache (full
    attention), None before the first call."""

    cache: RingBuffer | KVCache | None = None

    @property
    def is_empty(self) -> bool:
        return self.cache is None

    def nbytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes()

    def reorder(self, index: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache = self.cache.reorder(index)


class SlidingWindowAttention(nn.Module):
    """Softmax attention over the last ``window`` tokens plus the current one, rotary on the full head dim.

    ``Wqkv``: d -> 3d without bias, rows ordered ``(q|k|v, head, head_dim)`` as in the published checkpoints;
    ``out_proj``: d -> d without bias. Rotary positions count real tokens only (left padding is invisible).

    Args:
        config: reads ``hidden_size`` (d, divisible by the heads), ``num_attention_heads`` (H; head dim d / H,
            even when rotary is used), ``swa_window`` (tokens back each query sees, 128 in the published models)
            and ``rotary_base`` (10000, or None for no position embedding). No biases, as published.
        layer_idx: position in the model.
    """

    #: Full causal attention (no window) when True: see :class:`CausalAttention`.
    full_attention = False

    def __init__(self, config: PretrainedConfig, layer_idx: int = 0) -> None:
        super().__init__()
        hidden_size, num_heads = config.hidden_size, config.num_attention_heads
        window = None if self.full_attention else config.swa_window
        rotary_base = check_rotary_base(config.rotary_base)
        if hidden_size < 1 or num_heads < 1 or hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a positive multiple of num_heads ({num_heads})")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
            raise ValueError(f"window must be an int >= 0 or None (full attention), got {window!r}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        if rotary_base is not None and self.head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head dimension, got {self.head_dim}")
        self.window = window
        self.rotary_base = rotary_base
        self.layer_idx = layer_idx
        self.Wqkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def empty_state(self, batch: int) -> SlidingWindowState:
        """A fresh decoding state for ``batch`` sequences (filled by the first call)."""
        return SlidingWindowState()

    def state_size_bytes(
        self, batch: int = 1, dtype: torch.dtype = torch.float32, context_length: int | None = None
    ) -> int:
        """Bytes of the decoding state: ``window + 1`` keys and values (plus slot positions) per sequence, or,
        for full attention, ``context_length`` of them (which must then be given)."""
        if self.window is None:
            if context_length is None:
                raise ValueError("full attention has no constant state: pass context_length")
            slots = context_length
        else:
            slots = self.window + 1
        element = torch.empty((), dtype=dtype).element_size()
        return batch * (slots * (2 * self.hidden_size * element + 8) + 8)

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x if self.rotary_base is None else apply_rotary(x, positions, self.rotary_base)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
        state: SlidingWindowState | None = None,
    ) -> torch.Tensor:
        """``hidden_states [B, T, d] -> [B, T, d]``; ``prefix_lengths`` is ignored (causal mixer)."""
        check_hidden(hidden_states, self.hidden_size)
        b, t, _ = hidden_states.shape
        mask = check_mask(attention_mask, b, t, hidden_states.device)
        q, k, v = self.Wqkv(hidden_states).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(dim=2)
        if state is not None and not state.is_empty:
            o = self._continue(q, k, v, mask, state)
        else:
            if self.window is None and mask is None:
                # full causal attention without padding: SDPA's causal kernels, no T x T mask in memory
                pos = positions_from_mask(None, b, t, q.device)
                qh, kh = (self._rotate(x, pos).transpose(1, 2) for x in (q, k))
                o = F.scaled_dot_product_attention(
                    qh, kh, v.transpose(1, 2), is_causal=True, scale=1.0 / math.sqrt(self.head_dim)
                ).transpose(1, 2)
            else:
                window = self.window if self.window is not None else t
                o = sliding_window_attention(q, k, v, window, attention_mask=mask, rotary_base=self.rotary_base)
            if state is not None:
                rotated = self._rotate(k, positions_from_mask(mask, b, t, k.device))
                if self.window is None:
                    cache = KVCache.empty(b, self.num_heads, self.head_dim, k.dtype, k.device)
                else:
                    cache = RingBuffer.empty(b, self.window, self.num_heads, self.head_dim, k.dtype, k.device)
                state.cache = cache.write(rotated, v, mask)
        return self.out_proj(o.flatten(-2))

    def _continue(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, state: SlidingWindowState
    ) -> torch.Tensor:
        """Attend from new tokens ``[B, T, H, Dh]`` over the cached history plus themselves; update the cache."""
        cache = state.cache
        if isinstance(cache, RingBuffer) and q.shape[1] == 1 and (mask is None or bool(mask.all())):
            return sliding_window_decode_step(q, k, v, cache, rotary_base=self.rotary_base)
        b, t = q.shape[:2]
        real = mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=q.device)
        pos = cache.length[:, None] + real.long().cumsum(-1) - 1  # [B, T] positions of the new tokens
        q, k = self._rotate(q, pos.clamp_min(0)), self._rotate(k, pos.clamp_min(0))
        keys = torch.cat([cache.keys.to(k.dtype), k], dim=1)
        values = torch.cat([cache.values.to(v.dtype), v], dim=1)
        key_pos = torch.cat([cache.positions, torch.where(real, pos, torch.full_like(pos, -1))], dim=1)
        diff = pos[:, :, None] - key_pos[:, None, :]  # [B, T, S+T]
        allowed = (key_pos[:, None, :] >= 0) & (diff >= 0)
        if self.window is not None:
            allowed &= diff <= self.window
        allowed |= ~allowed.any(-1, keepdim=True)  # padded queries: any finite output
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        qh, kh, vh = (x.to(dtype).transpose(1, 2) for x in (q, keys, values))
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed[:, None], scale=1.0 / math.sqrt(self.head_dim))
        state.cache = cache.write(k, v, real)
        return o.transpose(1, 2).to(v.dtype)


class CausalAttention(SlidingWindowAttention):
    """Full causal softmax attention with rotary embedding (the Transformer baseline): a
    :class:`SlidingWindowAttention` without a window, whose decoding state is a growing :class:`KVCache`.
    ``config.swa_window`` is not read."""

    full_attention = True
