"""Sequence-mixing and channel-mixing ``nn.Module``s built on :mod:`jrt.ops`.

Every sequence mixer has one interface, as Hugging Face layers do:

* ``Mixer(config, layer_idx)``: the fields it reads from ``config`` are listed in its docstring (a
  :class:`jrt.models.JRTConfig`, or any config object with those fields);
* ``forward(hidden_states [B, T, d], attention_mask=None, prefix_lengths=None, state=None) -> [B, T, d]``:
  ``attention_mask [B, T]`` is 1 for tokens and 0 for padding (left padding supported everywhere);
  ``prefix_lengths`` is read by :class:`PrefixLinearAttention` only; ``state`` is the layer's decoding state,
  read and updated in place, so that a prefill followed by one-token steps equals one pass over the whole;
* ``empty_state(batch)``: a fresh decoding state (with ``nbytes()`` and ``reorder(index)``);
* ``state_size_bytes(batch, dtype, context_length=None)``: bytes of that state once filled, with ``dtype``
  the parameters' dtype (only full attention needs ``context_length``).

:data:`MIXERS` maps the names of ``JRTConfig.mixers`` to these classes; :func:`register_mixer` adds one.

- :class:`PrefixLinearAttention` (``"pla"``): JRT-RNN's encoder-decoder linear attention (Based + a non-causal
  prefix read);
- :class:`BasedLinearAttention` (``"based"``): the causal Based mixer;
- :class:`SlidingWindowAttention` (``"swa"``): softmax attention over ``window`` tokens back with rotary
  embedding, and :class:`CausalAttention` (``"attention"``): the same over the whole past;
- :class:`BaseConv` (``"base_conv"``): gated short depthwise convolution;
- :class:`SwiGLU` MLP and :class:`RMSNorm` (``torch.nn.RMSNorm``).
- the synthetic lab's mixers (:mod:`jrt.layers.lab`, the authors' synthetic models): :class:`GatedShortConv`
  (``"gated_conv"``) and :class:`NonCausalGatedShortConv` (``"gated_conv_noncausal"``), the authors' BaseConv
  form, and :class:`NonCausalBasedLinearAttention` (``"based_noncausal"``). The non-causal ones (``causal =
  False``) read a whole input at once and cannot continue a sequence token by token.
"""

from torch import nn

from jrt.layers.conv import BaseConv, ConvState
from jrt.layers.lab import GatedShortConv, NonCausalBasedLinearAttention, NonCausalGatedShortConv
from jrt.layers.linear_attention import (
    BasedLinearAttention,
    LinearAttentionState,
    PrefixLinearAttention,
    default_prefix_lengths,
)
from jrt.layers.mlp import RMSNorm, SwiGLU
from jrt.layers.sliding_window import CausalAttention, KVCache, SlidingWindowAttention, SlidingWindowState

#: Mixer names used by model configs (``JRTConfig.mixers``), mapped to their classes.
MIXERS: dict[str, type[nn.Module]] = {
    "base_conv": BaseConv,
    "pla": PrefixLinearAttention,
    "based": BasedLinearAttention,
    "swa": SlidingWindowAttention,
    "attention": CausalAttention,
    "gated_conv": GatedShortConv,
    "gated_conv_noncausal": NonCausalGatedShortConv,
    "based_noncausal": NonCausalBasedLinearAttention,
}


def register_mixer(name: str, cls: type[nn.Module]) -> type[nn.Module]:
    """Make ``cls`` (a mixer with the interface above) available to ``JRTConfig.mixers`` as ``name``.

    Raises:
        ValueError: ``name`` is taken by another class.
    """
    if MIXERS.get(name, cls) is not cls:
        raise ValueError(f"mixer name {name!r} is already registered to {MIXERS[name].__name__}")
    MIXERS[name] = cls
    return cls


__all__ = [
    "default_prefix_lengths",
    "MIXERS",
    "BaseConv",
    "BasedLinearAttention",
    "CausalAttention",
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
    "register_mixer",
]
