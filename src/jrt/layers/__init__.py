"""Sequence-mixing and channel-mixing ``nn.Module``s built on :mod:`jrt.ops`.

Every mixer takes ``hidden_states [B, T, d]`` and returns ``[B, T, d]``; it accepts
``attention_mask [B, T]`` (1 = token, 0 = padding, left padding supported everywhere) and an optional
per-layer decoding ``state`` (created with ``mixer.empty_state(...)``) that it reads and updates in place, so
that a prefill followed by one-token steps equals one pass over the whole sequence. Mixers also accept
``prefix_lengths`` uniformly; only :class:`PrefixLinearAttention` uses it.

- :class:`PrefixLinearAttention`: JRT-RNN's encoder-decoder linear attention (Based + a non-causal prefix read);
- :class:`BasedLinearAttention`: the causal Based mixer;
- :class:`SlidingWindowAttention`: softmax attention over ``window`` tokens back with rotary embedding
  (``window=None``: full causal softmax attention);
- :class:`BaseConv`: gated short depthwise convolution;
- :class:`SwiGLU` MLP and :class:`RMSNorm` (``torch.nn.RMSNorm``).
"""

from jrt.layers.conv import BaseConv, ConvState
from jrt.layers.linear_attention import BasedLinearAttention, LinearAttentionState, PrefixLinearAttention
from jrt.layers.mlp import RMSNorm, SwiGLU
from jrt.layers.sliding_window import KVCache, SlidingWindowAttention, SlidingWindowState

#: Mixer names used by model configs, mapped to their classes.
MIXERS = {
    "base_conv": BaseConv,
    "pla": PrefixLinearAttention,
    "based": BasedLinearAttention,
    "swa": SlidingWindowAttention,
    "attention": SlidingWindowAttention,
}

__all__ = [
    "MIXERS",
    "BaseConv",
    "BasedLinearAttention",
    "ConvState",
    "KVCache",
    "LinearAttentionState",
    "PrefixLinearAttention",
    "RMSNorm",
    "SlidingWindowAttention",
    "SlidingWindowState",
    "SwiGLU",
]
