"""Models the trainer can build by preset name, and one forward call for all of them.

- ``jrt-*`` and ``based-*``: :class:`jrt.models.JRTConfig` presets (JRT-RNN and its Based baseline);
- ``attn-*``: the Llama-style Transformer baseline, ``transformers.LlamaForCausalLM``;
- ``mamba-*``: ``transformers.MambaForCausalLM``.

The baselines use the GPT-2 vocabulary padded to 50264 like JRT-RNN, tied embeddings, and sizes near the
published 360M / 1.3B runs (the authors' exact baseline configs are not reproduced here).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from jrt.errors import check_known_keys, did_you_mean
from jrt.models.configuration_jrt import PRESETS, JRTConfig, config_fields
from jrt.models.modeling_jrt import JRTForCausalLM

PADDED_VOCAB = 50264

#: transformers baseline configs: name -> (family, kwargs).
BASELINE_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "attn-tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=4)),
    "attn-360m": ("llama", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                                num_attention_heads=16, num_key_value_heads=16)),
    "attn-1.3b": ("llama", dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                                num_attention_heads=16, num_key_value_heads=16)),
    "mamba-tiny": ("mamba", dict(hidden_size=64, num_hidden_layers=4, state_size=16)),
    "mamba-360m": ("mamba", dict(hidden_size=1024, num_hidden_layers=48, state_size=16)),
    "mamba-1.3b": ("mamba", dict(hidden_size=2048, num_hidden_layers=48, state_size=16)),
}


def _baseline(name: str, overrides: dict[str, Any]) -> nn.Module:
    family, kwargs = BASELINE_PRESETS[name]
    _check_baseline_overrides(family, overrides)
    kwargs = {**kwargs, "vocab_size": PADDED_VOCAB, "tie_word_embeddings": True, **overrides}
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        kwargs.setdefault("max_position_embeddings", 4096)
        kwargs.setdefault("rms_norm_eps", 1e-5)
        return LlamaForCausalLM(LlamaConfig(**kwargs))
    from transformers import MambaConfig, MambaForCausalLM

    return MambaForCausalLM(MambaConfig(**kwargs))


def _check_baseline_overrides(family: str, overrides: dict[str, Any]) -> None:
    """Unknown ``model_overrides`` keys of a transformers baseline are an error suggesting the closest field
    (transformers would keep them as stray attributes, silently)."""
    import inspect

    from transformers import LlamaConfig, MambaConfig, PretrainedConfig

    cls = LlamaConfig if family == "llama" else MambaConfig
    valid = set(inspect.signature(cls.__init__).parameters) | set(cls().to_dict()) | set(PretrainedConfig().to_dict())
    check_known_keys(overrides, valid - {"self", "kwargs"}, f"{family} config field")


def check_model_overrides(name: str, overrides: dict[str, Any]) -> None:
    """``ValueError`` for an unknown preset or an override key that is not a field of its config (the closest
    name suggested), without building the model."""
    if name in BASELINE_PRESETS:
        _check_baseline_overrides(BASELINE_PRESETS[name][0], overrides)
        return
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}{did_you_mean(name, model_names())}; "
                         f"known: {', '.join(model_names())}")
    check_known_keys(overrides, config_fields(), "model_overrides key")
    JRTConfig.from_preset(name, **overrides)  # values checked too (no model is built: cheap)


def model_names() -> list[str]:
    """All model preset names the trainer knows (the baselines and the JRT presets)."""
    return sorted(set(BASELINE_PRESETS) | set(PRESETS))


def build_model(name: str | Any, overrides: dict[str, Any] | None = None) -> nn.Module:
    """A freshly initialised model: ``name`` is a preset name (``overrides`` go into its config) or a model
    config (:class:`jrt.models.JRTConfig`, ``transformers``' ``MambaConfig`` or ``LlamaConfig``). This is the
    project's one model factory: the synthetic lab builds its models through it too."""
    if not isinstance(name, str):
        return _from_config(name, overrides)
    overrides = dict(overrides or {})
    if name in BASELINE_PRESETS:
        return _baseline(name, overrides)
    check_model_overrides(name, overrides)
    return JRTForCausalLM(JRTConfig.from_preset(name, **overrides))


def _from_config(config: Any, overrides: dict[str, Any] | None) -> nn.Module:
    if overrides:
        raise ValueError("overrides only apply to a preset name; set the fields on the config instead")
    from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

    if isinstance(config, JRTConfig):
        return JRTForCausalLM(config)
    if isinstance(config, MambaConfig):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "fast path is not available": on CPU the reference path is wanted
            return MambaForCausalLM(config)
    if isinstance(config, LlamaConfig):
        return LlamaForCausalLM(config)
    raise ValueError(f"build_model takes a preset name or a JRT / Mamba / Llama config, got {type(config).__name__}")


def vocab_size(model: nn.Module) -> int:
    return int(model.config.vocab_size)


def mask_token_id(model: nn.Module) -> int | None:
    mid = getattr(model.config, "mask_token_id", None)
    return None if mid is None else int(mid)


def default_objective(name: str) -> str:
    """``prefix_mlm`` for JRT-RNN presets, ``ntp`` for every baseline."""
    return "prefix_mlm" if name.startswith("jrt") else "ntp"


def forward_logits(model: nn.Module, input_ids: torch.Tensor, prefix_lengths: torch.Tensor | None) -> torch.Tensor:
    """Logits ``[B, T, V]``; ``prefix_lengths`` (``[B]``) only for models with a non-causal prefix."""
    if prefix_lengths is None:
        out = model(input_ids=input_ids)
    else:
        out = model(input_ids=input_ids, prefix_lengths=prefix_lengths)
    return out if isinstance(out, torch.Tensor) else out.logits


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied ones counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
