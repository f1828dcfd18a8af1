"""Mixers of the synthetic lab's authors-style models (the set-disjointness study of the paper, section 3).

They follow the mixer interface ``Mixer(config, layer_idx)`` (``config``: a :class:`~jrt.models.JRTConfig`),
``forward(hidden_states [B, T, d], attention_mask, prefix_lengths, state) -> [B, T, d]``, ``empty_state(batch)``
and ``state_size_bytes(batch, dtype, context_length=None)``.

- :class:`GatedShortConv`: the authors' BaseConv form ``conv(x) * linear(x) + x``: a depthwise short convolution
  (``config.conv_kernel_size`` taps, with bias) of the input, gated by a d -> d linear map, plus the input;
  causal (taps on the current and earlier tokens).
- :class:`NonCausalGatedShortConv`: the same with centred taps (``kernel_size // 2`` tokens on each side).
- :class:`NonCausalBasedLinearAttention`: Taylor linear attention in which every position reads every token of
  the input: ``y_i = phi(q_i) S / (phi(q_i) . z + eps)`` with ``S = sum_j phi(k_j) v_j^T``, ``z = sum_j phi(k_j)``.

The non-causal mixers read a whole input at once; they cannot continue a sequence token by token (a state that
already holds tokens is an error).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from jrt.layers._checks import check_hidden
from jrt.layers.conv import ConvState
from jrt.layers.linear_attention import LinearAttentionState
from jrt.ops.common import check_mask
from jrt.ops.feature_map import feature_dim, taylor_feature_map


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class GatedShortConv(nn.Module):
    """``conv(x) * proj(x) + x`` with a depthwise causal convolution of ``config.conv_kernel_size`` taps (with
    bias) and ``proj``: d -> d (with bias). Padded positions (``attention_mask == 0``) enter the convolution as
    zeros. Decoding state: the last ``kernel_size - 1`` inputs ``[B, d, kernel_size - 1]``."""

    causal = True

    def __init__(self, config: Any, layer_idx: int | None = None) -> None:
        super().__init__()
        d, k = int(config.hidden_size), int(config.conv_kernel_size)
        if not self.causal and k % 2 == 0:
            raise ValueError(f"a non-causal (centred) convolution needs an odd kernel size, got {k}")
        self.hidden_size, self.kernel_size, self.layer_idx = d, k, layer_idx
        self.conv = nn.Conv1d(d, d, k, groups=d, bias=True)
        self.proj = nn.Linear(d, d, bias=True)

    def empty_state(self, batch: int) -> ConvState:
        return ConvState()

    def state_size_bytes(self, batch: int = 1, dtype: torch.dtype = torch.float32,
                         context_length: int | None = None) -> int:
        """``batch * d * (kernel_size - 1)`` numbers of ``dtype`` (constant in the context length)."""
        return batch * self.hidden_size * (self.kernel_size - 1) * _dtype_bytes(dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
        state: ConvState | None = None,
    ) -> torch.Tensor:
        """``hidden_states [B, T, d] -> [B, T, d]``; ``prefix_lengths`` is ignored."""
        check_hidden(hidden_states, self.hidden_size)
        b, t, _ = hidden_states.shape
        mask = check_mask(attention_mask, b, t, hidden_states.device)
        x = hidden_states if mask is None else hidden_states * mask[..., None].to(hidden_states.dtype)
        u = x.transpose(1, 2)  # [B, d, T]
        k = self.kernel_size
        if state is not None and state.buffer is not None:
            if not self.causal:
                raise ValueError("a non-causal convolution cannot continue a sequence from a filled state")
            history = state.buffer.to(u.dtype)
        else:
            history = u.new_zeros(b, self.hidden_size, k - 1 if self.causal else k // 2)
        right = u.new_zeros(b, self.hidden_size, 0 if self.causal else k // 2)
        padded = torch.cat([history, u, right], dim=-1)
        conv = F.conv1d(padded, self.conv.weight.to(u.dtype), self.conv.bias.to(u.dtype), groups=self.hidden_size)
        if state is not None and k > 1:
            state.buffer = torch.cat([history, u], dim=-1)[..., -(k - 1):].clone()  # the last k - 1 inputs
        return conv.transpose(1, 2) * self.proj(hidden_states) + hidden_states


class NonCausalGatedShortConv(GatedShortConv):
    """:class:`GatedShortConv` with centred taps: position ``i`` reads ``i - k//2 .. i + k//2``."""

    causal = False


class NonCausalBasedLinearAttention(nn.Module):
    """Based linear attention without a causal mask (the authors' non-causal Based).

    Queries and keys ``[B, T, H, F]`` (``H = config.num_attention_heads``, ``F = config.feature_dim``), values
    ``[B, T, H, d/H]``; ``phi`` is the Taylor map (:func:`jrt.ops.taylor_feature_map`, ``D = 1+F+F^2``). Every
    position reads the sums over all real tokens of the input (padding excluded), so each output is invariant to
    permuting the other tokens. The state after a prefill is ``(S [B, H, D, d/H], z [B, H, D])`` in float32.
    """

    causal = False

    def __init__(self, config: Any, layer_idx: int | None = None) -> None:
        super().__init__()
        d, h, f = int(config.hidden_size), int(config.num_attention_heads), int(config.feature_dim)
        if d % h:
            raise ValueError(f"hidden_size ({d}) must be divisible by num_attention_heads ({h})")
        self.hidden_size, self.num_heads, self.head_dim, self.feature_dim = d, h, d // h, f
        self.eps = float(config.linear_attention_eps)
        self.layer_idx = layer_idx
        self.proj_q = nn.Linear(d, h * f, bias=False)
        self.proj_k = nn.Linear(d, h * f, bias=False)
        self.proj_v = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    def empty_state(self, batch: int) -> LinearAttentionState:
        return LinearAttentionState()

    def state_size_bytes(self, batch: int = 1, dtype: torch.dtype = torch.float32,
                         context_length: int | None = None) -> int:
        """Bytes of ``(S, z)`` for ``batch`` sequences (always float32, whatever ``dtype``)."""
        dd = feature_dim(self.feature_dim)
        return batch * self.num_heads * (dd * self.head_dim + dd) * 4

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
        state: LinearAttentionState | None = None,
    ) -> torch.Tensor:
        """``hidden_states [B, T, d] -> [B, T, d]``; ``prefix_lengths`` is ignored (everything is read)."""
        check_hidden(hidden_states, self.hidden_size)
        if state is not None and state.kv is not None:
            raise ValueError("non-causal linear attention cannot continue a sequence from a filled state")
        b, t, _ = hidden_states.shape
        mask = check_mask(attention_mask, b, t, hidden_states.device)
        heads = (self.num_heads, -1)
        q = taylor_feature_map(self.proj_q(hidden_states).unflatten(-1, heads))  # [B, T, H, D]
        k = taylor_feature_map(self.proj_k(hidden_states).unflatten(-1, heads))
        v = self.proj_v(hidden_states).unflatten(-1, heads)  # [B, T, H, Dv]
        acc = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        if mask is not None:
            k = k * mask[..., None, None].to(acc)
        s = torch.einsum("bthd,bthe->bhde", k, v)
        z = k.sum(dim=1)  # [B, H, D]
        num = torch.einsum("bthd,bhde->bthe", q, s)
        den = torch.einsum("bthd,bhd->bth", q, z)[..., None] + self.eps
        if state is not None:
            state.kv = (s.float(), z.float())
        out = (num / den).to(hidden_states.dtype)
        return self.out_proj(out.flatten(-2))
