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
- :class:`SwiGLU` MLP and :class:`RMSNorm` (``torch.nn.RMSNorm``);
- the synthetic lab's authors-style mixers (:mod:`jrt.layers.lab`): :class:`GatedShortConv` and
  :class:`NonCausalGatedShortConv` (the authors' BaseConv form), :class:`NonCausalBasedLinearAttention`.
"""

from jrt.layers.conv import BaseConv, ConvState
from jrt.layers.lab import GatedShortConv, NonCausalBasedLinearAttention, NonCausalGatedShortConv
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

#: The synthetic lab's mixers (``Mixer(config, layer_idx)``; the non-causal ones cannot decode token by token).
LAB_MIXERS = {
    "gated_conv": GatedShortConv,
    "gated_conv_noncausal": NonCausalGatedShortConv,
    "based_noncausal": NonCausalBasedLinearAttention,
}

__all__ = [
    "LAB_MIXERS",
    "MIXERS",
    "BaseConv",
    "BasedLinearAttention",
    "ConvState",
    "GatedShortConv",
    "KVCache",
    "LinearAttentionState",
    "NonCausalBasedLinearAttention",
    "NonCausalGatedShortConv",
    "PrefixLinearAttention",
    "RMSNorm",
    "SlidingWindowAttention",
    "SlidingWindowState",
    "SwiGLU",
]
