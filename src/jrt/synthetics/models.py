"""The lab's small models, built from the library's own model (:class:`jrt.models.JRTForCausalLM`) and, as a
state-space representative, ``transformers``' Mamba (its CPU reference path).

==============  ===============================================  =============================================
``arch``        layers (``num_layers`` blocks)                    recurrent state (``state_size_bytes``)
==============  ===============================================  =============================================
``attention``   BaseConv, causal softmax attention, ...          KV cache ``T * (2 * d * 4 + 8)`` bytes per
                                                                 attention layer, plus BaseConv
``based``       BaseConv, Based (causal linear attention), ...   per Based layer ``H * (Dv * D + D) * 4``;
                                                                 per BaseConv ``(k - 1) * expand * d * 4``
``jrt_rnn``     BaseConv, PLA (non-causal over the prefix), ...  same as ``based`` (PLA decodes from ``(S, z)``)
``mamba``       ``transformers.MambaForCausalLM``                per layer ``d_inner * (d_state + k - 1) * 4``
==============  ===============================================  =============================================

``D = 1 + f + f^2`` is the Taylor feature dimension, ``Dv = d / H`` the value head dim, ``T`` the sequence
length, float32 everywhere. JRT-Prompt is not a separate model: it is ``based`` fed the read-twice input.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from jrt.synthetics.config import ModelSpec

#: Mamba's depthwise convolution length (``transformers``' default).
MAMBA_CONV_KERNEL = 4
#: Up to this sequence length the linear-attention mixers use the quadratic reference form of the operators
#: (the same numbers; far fewer kernel launches than the chunked form for the lab's short sequences).
REFERENCE_MAX_LEN = 256


def mixer_pattern(arch: str, num_layers: int) -> list[str]:
    """The ``JRTConfig.mixers`` list of a lab architecture: BaseConv alternating with the sequence mixer
    (starting with BaseConv), so that the architectures differ only in that mixer."""
    mixer = {"based": "based", "jrt_rnn": "pla", "attention": "attention"}.get(arch)
    if mixer is None:
        raise ValueError(f"no JRT mixer pattern for arch {arch!r}")
    if num_layers < 2:
        raise ValueError(f"{arch} needs at least 2 layers (BaseConv + {mixer}), got {num_layers}")
    return ["base_conv" if i % 2 == 0 else mixer for i in range(num_layers)]


class LabModel(nn.Module):
    """A causal LM for the synthetic tasks: ``forward(input_ids [N, T], prefix_lengths [N] | None) -> logits
    [N, T, V]`` (logits at position ``i`` predict the label at ``i``); ``state_size_bytes(seq_len)``."""

    def __init__(self, spec: ModelSpec, inner: nn.Module, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        self.spec = spec
        self.inner = inner
        self.vocab_size = vocab_size
        self.seq_len = seq_len

    def forward(self, input_ids: torch.Tensor, prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:
        if self.spec.arch == "mamba":
            return self.inner(input_ids=input_ids, use_cache=False).logits
        if self.spec.arch == "jrt_rnn":
            if prefix_lengths is None:
                raise ValueError("jrt_rnn needs prefix_lengths (the tokens its PLA layers read non-causally)")
            return self.inner(input_ids=input_ids, prefix_lengths=prefix_lengths, use_cache=False).logits
        return self.inner(input_ids=input_ids, use_cache=False).logits

    def state_size_bytes(self, seq_len: int | None = None) -> int:
        """Bytes of the state one sequence needs after reading ``seq_len`` tokens (default: the task's length);
        constant in ``seq_len`` for every arch except ``attention``."""
        seq_len = self.seq_len if seq_len is None else int(seq_len)
        if self.spec.arch == "mamba":
            cfg = self.inner.config
            d_inner = cfg.intermediate_size
            per_layer = d_inner * cfg.state_size + d_inner * (cfg.conv_kernel - 1)
            return int(cfg.num_hidden_layers * per_layer * 4)
        return int(self.inner.state_size_bytes(1, context_length=seq_len))


def build_model(spec: ModelSpec, vocab_size: int, seq_len: int) -> LabModel:
    """A freshly initialised lab model (float32) for sequences of up to ``seq_len`` tokens."""
    if spec.arch == "mamba":
        from transformers import MambaConfig, MambaForCausalLM

        cfg = MambaConfig(
            vocab_size=vocab_size, hidden_size=spec.d_model, state_size=spec.d_state,
            num_hidden_layers=spec.num_layers, expand=spec.expand, conv_kernel=MAMBA_CONV_KERNEL,
            use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0, use_mambapy=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "fast path is not available": the CPU path is what we want
            inner = MambaForCausalLM(cfg)
        return LabModel(spec, inner, vocab_size, seq_len)

    from jrt.models import JRTConfig, JRTForCausalLM

    cfg = JRTConfig(
        vocab_size=vocab_size, hidden_size=spec.d_model, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, feature_dim=spec.feature_dim,
        mixers=mixer_pattern(spec.arch, spec.num_layers), intermediate_size=2 * spec.d_model,
        max_prefix_length=seq_len, linear_attention_eps=1e-6, use_cache=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, mask_token_id=None,
    )
    inner = JRTForCausalLM(cfg)
    if seq_len <= REFERENCE_MAX_LEN:
        for block in inner.model.layers:
            if block.mixer_name in ("based", "pla"):
                block.mixer.impl = "reference"
    return LabModel(spec, inner, vocab_size, seq_len)
