"""Based linear attention and JRT-RNN's prefix linear attention as layers.

Both project ``x [B, T, d]`` to queries/keys ``[B, T, H, F]`` (F = ``feature_dim``, 16 in the published
models) and values ``[B, T, H, d/H]``, apply normalised Taylor linear attention (:mod:`jrt.ops`) and project
back with ``out_proj``. Decoding state per layer: ``(S [B, H, D, d/H], z [B, H, D])`` with ``D = 1+F+F^2``,
constant in the context length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from jrt.layers._checks import check_hidden
from jrt.ops import feature_dim, linear_attention, prefix_linear_attention
from jrt.ops.common import check_eps, check_impl, check_mask

if TYPE_CHECKING:  # any config object with the fields listed in the docstrings
    from transformers import PretrainedConfig

State = tuple[torch.Tensor, torch.Tensor]


def default_prefix_lengths(
    batch: int, length: int, mask: torch.Tensor | None, max_prefix_length: int | None, device: torch.device | str
) -> torch.Tensor:
    """The prefix rule of every model that reads a prefix (JRT-RNN's PLA layers, the linearized ``jrt`` students):
    by default the prefix is every real token of the prompt, capped at ``max_prefix_length`` (None: no cap).

    Args:
        batch, length: ``B`` and ``T`` of the input.
        mask: ``[B, T]`` bool (True = token) or None (every position is a token).

    Returns:
        int64 ``[B]`` prefix lengths on ``device``. (The other half of the rule, that a call continuing from a
        filled state reads no prefix, is each model's: it passes no prefix then.)
    """
    real = mask.long().sum(-1) if mask is not None else torch.full((batch,), length, device=device)
    if max_prefix_length is not None:
        real = real.clamp_max(max_prefix_length)
    return real.to(device=device, dtype=torch.long)


@dataclass
class LinearAttentionState:
    """Decoding state of one linear-attention layer: ``kv = (S [B, H, D, Dv], z [B, H, D])`` in float32.

    ``kv is None`` means nothing has been read yet (the next call is a prefill: for prefix linear attention it
    reads its prefix non-causally).
    """

    kv: State | None = None

    @property
    def is_empty(self) -> bool:
        return self.kv is None

    def nbytes(self) -> int:
        return 0 if self.kv is None else sum(x.numel() * x.element_size() for x in self.kv)

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows in place (beam search, batch filtering)."""
        if self.kv is not None:
            self.kv = (self.kv[0][index], self.kv[1][index])


class BasedLinearAttention(nn.Module):
    """Causal Based mixer: ``out_proj(linear_attention(proj_q x, proj_k x, proj_v x))``.

    Args:
        config: reads ``hidden_size`` (d, divisible by the heads), ``num_attention_heads`` (H; values have
            ``d / H`` dims per head), ``feature_dim`` (F, the query/key dim per head before the Taylor map,
            ``D = 1+F+F^2``), ``linear_attention_eps`` (added to the denominator; 1e-12 in the published models)
            and ``ops_impl`` (the operator implementation: ``"auto"``, ``"chunk"``, ``"reference"``,
            ``"recurrent"``, ``"triton"``; kept as ``self.impl``).
        layer_idx: position of the layer in its model.
    """

    def __init__(self, config: PretrainedConfig, layer_idx: int = 0) -> None:
        super().__init__()
        hidden_size, num_heads = config.hidden_size, config.num_attention_heads
        if hidden_size < 1 or num_heads < 1 or hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a positive multiple of num_heads ({num_heads})")
        if config.feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {config.feature_dim}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.feature_dim = feature_dim = config.feature_dim
        self.eps = check_eps(config.linear_attention_eps, "linear_attention_eps")
        self.impl = check_impl(config.ops_impl)
        self.layer_idx = layer_idx
        self.proj_q = nn.Linear(hidden_size, num_heads * feature_dim, bias=False)
        self.proj_k = nn.Linear(hidden_size, num_heads * feature_dim, bias=False)
        self.proj_v = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def _heads(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, dim))

    def empty_state(self, batch: int) -> LinearAttentionState:
        """A fresh decoding state for ``batch`` sequences (filled by the first call)."""
        return LinearAttentionState()

    def state_size_bytes(
        self, batch: int = 1, dtype: torch.dtype = torch.float32, context_length: int | None = None
    ) -> int:
        """Bytes of the decoding state for ``batch`` sequences: float32 ``S`` and ``z`` whatever the parameter
        ``dtype``, constant in ``context_length``."""
        d = feature_dim(self.feature_dim)
        return batch * self.num_heads * (d * self.head_dim + d) * 4

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
        state: LinearAttentionState | None = None,
    ) -> torch.Tensor:
        """``hidden_states [B, T, d] -> [B, T, d]``; ``prefix_lengths`` is ignored (causal mixer).

        With ``state``, starts from ``state.kv`` (when set) and stores the final state back into it.
        """
        check_hidden(hidden_states, self.hidden_size)
        b, t, _ = hidden_states.shape
        mask = check_mask(attention_mask, b, t, hidden_states.device)
        q = self._heads(self.proj_q(hidden_states), self.feature_dim)
        k = self._heads(self.proj_k(hidden_states), self.feature_dim)
        v = self._heads(self.proj_v(hidden_states), self.head_dim)
        o, final = linear_attention(
            q, k, v, initial_state=state.kv if state is not None else None,
            output_final_state=state is not None, eps=self.eps, attention_mask=mask, impl=self.impl,
        )
        if state is not None:
            state.kv = final
        return self.out_proj(o.flatten(-2))


class PrefixLinearAttention(BasedLinearAttention):
    """JRT-RNN prefix linear attention: Based plus encoder projections ``proj_k_enc, proj_v_enc`` that read the
    first ``M_b`` real tokens of each sequence non-causally (docs/design.md, section 3).

    The prefix rules live here (and only here): on the first call of a sequence (no state, or an empty one) the
    prefix is ``prefix_lengths`` (int ``[B]`` or int) or, when None, every real token capped at
    ``max_prefix_length``; later calls with a filled state decode causally from ``(S_T + S_enc, z_T + z_enc)``
    at O(1) cost per token, and reject a non-zero ``prefix_lengths``.

    Args:
        config: as :class:`BasedLinearAttention`, plus ``max_prefix_length`` (cap of the default prefix, None = no
            cap; 1024 in the published models).
        layer_idx: position of the layer in its model.
    """

    def __init__(self, config: PretrainedConfig, layer_idx: int = 0) -> None:
        super().__init__(config, layer_idx)
        max_prefix_length = config.max_prefix_length
        if max_prefix_length is not None and max_prefix_length < 0:
            raise ValueError(f"max_prefix_length must be >= 0 or None, got {max_prefix_length}")
        self.max_prefix_length = max_prefix_length
        self.proj_k_enc = nn.Linear(self.hidden_size, self.num_heads * self.feature_dim, bias=False)
        self.proj_v_enc = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=False)

    def default_prefix_lengths(self, batch: int, length: int, mask: torch.Tensor | None, device) -> torch.Tensor:
        """Every real token of each sequence, capped at ``max_prefix_length``: int ``[B]``
        (:func:`default_prefix_lengths`)."""
        return default_prefix_lengths(batch, length, mask, self.max_prefix_length, device)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | int | None = None,
        state: LinearAttentionState | None = None,
    ) -> torch.Tensor:
        """``hidden_states [B, T, d] -> [B, T, d]``.

        Raises:
            ValueError: ``prefix_lengths`` larger than a sequence's real tokens, or non-zero prefix lengths with
                a state that already holds a prefix (the prefix can only be read at the start).
        """
        check_hidden(hidden_states, self.hidden_size)
        if state is not None and not state.is_empty:
            if prefix_lengths is not None and bool(torch.as_tensor(prefix_lengths).ne(0).any()):
                raise ValueError(
                    "prefix_lengths must be None or 0 when continuing from a decoding state: the prefix is read "
                    "only by the first call of a sequence"
                )
            return super().forward(hidden_states, attention_mask, None, state)
        b, t, _ = hidden_states.shape
        mask = check_mask(attention_mask, b, t, hidden_states.device)
        if prefix_lengths is None:
            prefix_lengths = self.default_prefix_lengths(b, t, mask, hidden_states.device)
        q = self._heads(self.proj_q(hidden_states), self.feature_dim)
        k = self._heads(self.proj_k(hidden_states), self.feature_dim)
        v = self._heads(self.proj_v(hidden_states), self.head_dim)
        k_enc = self._heads(self.proj_k_enc(hidden_states), self.feature_dim)
        v_enc = self._heads(self.proj_v_enc(hidden_states), self.head_dim)
        o, final = prefix_linear_attention(
            q, k, v, k_enc, v_enc, prefix_lengths, attention_mask=mask,
            output_final_state=state is not None, eps=self.eps, impl=self.impl,
        )
        if state is not None:
            state.kv = final
        return self.out_proj(o.flatten(-2))
