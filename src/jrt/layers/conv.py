"""BaseConv: a gated short depthwise convolution (the cheap local mixer of Based / JRT-RNN)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from jrt.layers._checks import check_hidden
from jrt.ops.common import check_mask, drop_rows

if TYPE_CHECKING:  # any config object with the fields listed in the docstrings
    from transformers import PretrainedConfig


@dataclass
class ConvState:
    """Rolling decoding state of one :class:`BaseConv`: the last ``kernel_size - 1`` conv inputs
    ``buffer [B, C, kernel_size - 1]`` (``C = expand * d``), or None before the first call."""

    buffer: torch.Tensor | None = None

    @property
    def is_empty(self) -> bool:
        return self.buffer is None

    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()

    def reorder(self, index: torch.Tensor) -> None:
        if self.buffer is not None:
            self.buffer = self.buffer[index]


class BaseConv(nn.Module):
    """``out_proj(silu(conv(u1)) * u2)`` with ``[u1, u2] = in_proj(x)``.

    ``in_proj``: d -> 2 * expand * d (bias); rows ``[:expand*d]`` are ``u1`` (the convolved branch), rows
    ``[expand*d:]`` are ``u2`` (the multiplier). ``conv``: depthwise causal ``Conv1d`` of ``kernel_size`` taps
    without bias (tap ``kernel_size - 1`` multiplies the current token). ``out_proj``: expand * d -> d (bias).
    Padded positions (``attention_mask == 0``) enter the convolution as zeros, so left padding equals the
    convolution's own zero padding.

    Args:
        config: reads ``hidden_size`` (d), ``conv_kernel_size`` (the convolution length, 3 in the published
            models) and ``conv_expand`` (the width of each branch relative to d, 2 in the published models:
            ``in_proj`` d -> 4d). ``in_proj`` and ``out_proj`` have biases, as published.
        layer_idx: position in the model.
    """

    def __init__(self, config: PretrainedConfig, layer_idx: int = 0) -> None:
        super().__init__()
        hidden_size, kernel_size, expand = config.hidden_size, config.conv_kernel_size, config.conv_expand
        if hidden_size < 1 or kernel_size < 1 or expand < 1:
            raise ValueError(
                f"hidden_size, kernel_size and expand must be >= 1, got {hidden_size}, {kernel_size}, {expand}"
            )
        self.hidden_size = hidden_size
        self.kernel_size = kernel_size
        self.channels = expand * hidden_size
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(hidden_size, 2 * self.channels, bias=True)
        self.conv = nn.Conv1d(self.channels, self.channels, kernel_size, groups=self.channels, bias=False)
        self.out_proj = nn.Linear(self.channels, hidden_size, bias=True)

    def empty_state(self, batch: int) -> ConvState:
        """A fresh decoding state for ``batch`` sequences (filled by the first call)."""
        return ConvState()

    def state_size_bytes(
        self, batch: int = 1, dtype: torch.dtype = torch.float32, context_length: int | None = None
    ) -> int:
        """Bytes of the rolling state: ``batch * C * (kernel_size - 1)`` numbers of ``dtype`` (the parameters'),
        constant in ``context_length``."""
        return batch * self.channels * (self.kernel_size - 1) * torch.empty((), dtype=dtype).element_size()

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
        state: ConvState | None = None,
    ) -> torch.Tensor:
        """``hidden_states [B, T, d] -> [B, T, d]``; with ``state``, continues from and updates its buffer."""
        check_hidden(hidden_states, self.hidden_size)
        b, t, _ = hidden_states.shape
        mask = check_mask(attention_mask, b, t, hidden_states.device)
        u1, u2 = self.in_proj(hidden_states).chunk(2, dim=-1)
        u1 = drop_rows(u1, mask)
        u1 = u1.transpose(1, 2)  # [B, C, T]
        k = self.kernel_size
        if state is not None and state.buffer is not None:
            history = state.buffer.to(u1.dtype)
        else:
            history = u1.new_zeros(b, self.channels, k - 1)
        padded = torch.cat([history, u1], dim=-1)  # [B, C, k-1+T]
        # depthwise causal convolution as a sum over the taps (tap k-1 = current token); equal to
        # conv1d(padding=k-1) cut to the first T outputs, without conv1d's slow first-call setup on CPU
        weight = self.conv.weight[:, 0, :].to(padded.dtype)  # [C, k]
        conv = padded[..., :t] * weight[:, :1]
        for j in range(1, k):
            conv = conv + padded[..., j : j + t] * weight[:, j : j + 1]
        if state is not None:
            state.buffer = padded[..., padded.shape[-1] - (k - 1):].clone() if k > 1 else padded[..., :0]
        y = F.silu(conv).transpose(1, 2) * u2
        return self.out_proj(y)
