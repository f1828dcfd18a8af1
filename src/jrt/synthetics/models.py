"""The lab's small models, built by the project's model factory (:func:`jrt.models.factory.build_model`) from
the library's own model (:class:`jrt.models.JRTForCausalLM`) and, as a state-space representative,
``transformers``' Mamba (its CPU reference path).

===================  ==========================================  ==============================================
``arch``             layers (``num_layers`` blocks)               recurrent state (``state_size_bytes``)
===================  ==========================================  ==============================================
``attention``        conv, causal softmax attention, ...          KV cache ``T * (2 * d * 4 + 8)`` bytes per
                                                                  attention layer, plus the convs
``based``            conv, Based (causal linear attention), ...   per Based layer ``H * (Dv * D + D) * 4``; per
                                                                  conv ``(k - 1) * C * 4`` (``C = 2d`` for the
                                                                  library's BaseConv, ``d`` for the authors')
``based_noncausal``  centred conv, non-causal Based, ...          same as ``based`` (the state after reading)
``jrt_rnn``          conv, PLA (non-causal over the prefix), ...  same as ``based`` (PLA decodes from ``(S, z)``)
``mamba``            ``transformers.MambaForCausalLM``            per layer ``d_inner * (d_state + k - 1) * 4``
===================  ==========================================  ==============================================

``D = 1 + f + f^2`` is the Taylor feature dimension, ``Dv = d / H`` the value head dim, ``T`` the sequence
length, float32 everywhere. JRT-Prompt is not a separate model: it is ``based`` fed the read-twice input.
``ModelSpec.style`` picks the library's blocks (BaseConv, SwiGLU MLP) or the authors' (their conv form, no MLP,
embedding dropout 0.1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from jrt.synthetics.config import ModelSpec

#: Mamba's depthwise convolution length (``transformers``' default).
MAMBA_CONV_KERNEL = 4
#: Up to this sequence length the linear-attention mixers use the quadratic reference form of the operators
#: (the same numbers; far fewer kernel launches than the chunked form for the lab's short sequences).
REFERENCE_MAX_LEN = 256


def mixer_pattern(arch: str, num_layers: int, style: str = "library") -> list[str]:
    """The ``JRTConfig.mixers`` list of a lab architecture: a short convolution alternating with the sequence
    mixer (starting with the convolution), so that the architectures differ only in that mixer. The
    convolution is the library's BaseConv (``style="library"``) or the authors' form (``"authors"``, centred
    for ``based_noncausal``)."""
    mixer = {"based": "based", "jrt_rnn": "pla", "attention": "attention",
             "based_noncausal": "based_noncausal"}.get(arch)
    if mixer is None:
        raise ValueError(f"no JRT mixer pattern for arch {arch!r}")
    if num_layers < 2:
        raise ValueError(f"{arch} needs at least 2 layers (conv + {mixer}), got {num_layers}")
    if arch == "based_noncausal":
        conv = "gated_conv_noncausal"
    else:
        conv = "gated_conv" if style == "authors" else "base_conv"
    return [conv if i % 2 == 0 else mixer for i in range(num_layers)]


class LabModel(nn.Module):
    """A LM for the synthetic tasks: ``forward(input_ids [N, T], prefix_lengths [N] | None) -> logits
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


def lab_model_config(spec: ModelSpec, vocab_size: int, seq_len: int) -> Any:
    """The model config of a lab spec: a :class:`jrt.models.JRTConfig`, or ``transformers``' ``MambaConfig``."""
    if spec.arch == "mamba":
        from transformers import MambaConfig

        return MambaConfig(
            vocab_size=vocab_size, hidden_size=spec.d_model, state_size=spec.d_state,
            num_hidden_layers=spec.num_layers, expand=spec.expand, conv_kernel=MAMBA_CONV_KERNEL,
            use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0, use_mambapy=False,
        )
    from jrt.models import JRTConfig

    authors = spec.style == "authors"
    return JRTConfig(
        vocab_size=vocab_size, hidden_size=spec.d_model, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, feature_dim=spec.feature_dim,
        mixers=mixer_pattern(spec.arch, spec.num_layers, spec.style), intermediate_size=2 * spec.d_model,
        use_mlp=not authors, embedding_dropout=0.1 if authors else 0.0,
        max_prefix_length=seq_len, linear_attention_eps=1e-6, use_cache=False,
        ops_impl="reference" if seq_len <= REFERENCE_MAX_LEN else "auto",
        bos_token_id=0, eos_token_id=0, pad_token_id=0, mask_token_id=None,
    )


def build_lab_model(spec: ModelSpec, vocab_size: int, seq_len: int) -> LabModel:
    """A freshly initialised lab model (float32) for sequences of up to ``seq_len`` tokens, built by the
    project's model factory :func:`jrt.models.factory.build_model` from :func:`lab_model_config`."""
    from jrt.models.factory import build_model

    inner = build_model(lab_model_config(spec, vocab_size, seq_len))
    return LabModel(spec, inner, vocab_size, seq_len)
