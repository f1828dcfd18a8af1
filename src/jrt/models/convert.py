"""Convert the authors' published JRT-RNN checkpoints (``hazyresearch/JRT-360M-30B``, ``JRT-1B-50B``) into
:class:`JRTForCausalLM` / ``save_pretrained`` folders.

The official checkpoint is a flash-attn ``GPTLMHeadModel`` state dict (layout in the shared data folder's
``official/README.md``): keys may carry a leading ``model.`` (Lightning) and ``*metrics*`` scalars, older files
spell the BaseConv attribute ``conv1``. The row layouts of the official tensors already match the JRT layers
(SwiGLU ``fc1`` value-then-gate, ``Wqkv`` rows q|k|v head-major, BaseConv ``in_proj`` u1|u2), so conversion is
a renaming plus strict checks: any missing, unexpected or mis-shaped tensor is reported in one ``ValueError``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from jrt.models.configuration_jrt import JRTConfig
from jrt.models.modeling_jrt import JRTForCausalLM
from jrt.tensor_files import read_json_file, read_tensor_file

#: Weight files looked for in a checkpoint folder, in order of preference.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

#: Official config fields that change keys or shapes (``n_inner`` is required: its fallback differs).
REQUIRED_FIELDS = ("n_embd", "n_layer", "n_head", "n_inner", "vocab_size")

_GLOBAL_KEYS = {
    "transformer.embeddings.word_embeddings.weight": "model.embeddings.weight",
    "transformer.ln_f.weight": "model.norm_f.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_KEY = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------


def _mixer_kind(spec: Mapping[str, Any] | None, default: str) -> str:
    target = str((spec or {}).get("_target_", "")).lower()
    if "prefix" in target:
        return "pla"
    if "linear" in target or "based" in target.rsplit(".", 1)[-1]:
        return "based"
    if "slid" in target or "window" in target:
        return "swa"
    if "conv" in target:
        return "base_conv"
    return default


def official_config_to_jrt(official: Mapping[str, Any], **overrides: Any) -> JRTConfig:
    """Translate the official ``config.json`` (a ``GPT2Config`` dict plus mixer dicts) into a :class:`JRTConfig`.

    Only the fields that change keys, shapes or numerics are read; others are ignored.

    Raises:
        ValueError: a required field is missing, or the layout is not one JRT supports (LayerNorm instead of
            RMSNorm, a non-SwiGLU MLP, different head counts across mixers).
    """
    if not isinstance(official, Mapping):
        raise ValueError(f"official config.json must hold a JSON object, got {type(official).__name__}")
    missing = [name for name in REQUIRED_FIELDS if official.get(name) is None]
    if missing:
        raise ValueError(f"official config.json lacks required field(s): {', '.join(missing)}")
    if official.get("rms_norm") is False:
        raise ValueError("official config uses LayerNorm (rms_norm false): not a JRT-RNN checkpoint layout")
    activation = official.get("activation_function", "swiglu")
    if activation != "swiglu":
        raise ValueError(f"official config has activation_function {activation!r}; JRT models need 'swiglu'")
    for flag in ("mlp_fc1_bias", "mlp_fc2_bias", "qkv_proj_bias", "out_proj_bias"):
        if official.get(flag):
            raise ValueError(f"official config sets {flag}: true, which JRT models do not support")
    try:
        d, layers, heads = int(official["n_embd"]), int(official["n_layer"]), int(official["n_head"])
        multiple = int(official.get("pad_vocab_size_multiple", 1) or 1)
        vocab = int(math.ceil(int(official["vocab_size"]) / multiple) * multiple)
    except (TypeError, ValueError) as err:
        raise ValueError(f"official config.json has a malformed size field ({err})") from None
    if min(d, layers, heads, multiple, vocab) < 1:
        raise ValueError("official config.json sizes (n_embd, n_layer, n_head, vocab_size) must be positive")
    mixer = official.get("mixer") or {}
    alt = official.get("alt_mixer") or {}
    alt2 = official.get("alt_mixer_2") or {}
    for name, spec in (("mixer", mixer), ("alt_mixer", alt), ("alt_mixer_2", alt2)):
        if not isinstance(spec, Mapping):
            raise ValueError(f"official config field {name} must be an object, got {type(spec).__name__}")
    mixers = [_mixer_kind(mixer, "base_conv")] * layers
    for field_name, spec, default in (("alt_mixer_layers", alt, "pla"), ("alt_mixer_2_layers", alt2, "swa")):
        indices = official.get(field_name) or []
        if not isinstance(indices, list):
            raise ValueError(f"official config field {field_name} must be a list of layer indices, got {indices!r}")
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layers:
                raise ValueError(f"official config field {field_name} holds {i!r}: layer indices must be ints in "
                                 f"[0, n_layer) = [0, {layers})")
            mixers[i] = _mixer_kind(spec, default)
    for name, spec in (("alt_mixer", alt), ("alt_mixer_2", alt2)):
        if spec.get("num_heads") not in (None, heads):
            raise ValueError(f"{name}.num_heads = {spec['num_heads']} differs from n_head = {heads}: unsupported")
    try:
        fields = _jrt_fields(official, d, layers, heads, vocab, mixers, mixer, alt, alt2)
    except (TypeError, ValueError) as err:
        raise ValueError(f"official config.json has a malformed field ({err})") from None
    fields.update(overrides)
    return JRTConfig(**fields)


def _jrt_fields(official: Mapping[str, Any], d: int, layers: int, heads: int, vocab: int, mixers: list[str],
                mixer: Mapping[str, Any], alt: Mapping[str, Any], alt2: Mapping[str, Any]) -> dict[str, Any]:
    window_size = alt2.get("window_size", 256)
    enc_length = alt.get("enc_length", official.get("enc_length", 1024))
    fields = {
        "vocab_size": vocab,
        "hidden_size": d,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "feature_dim": int(alt.get("feature_dim", 16)),
        "mixers": mixers,
        # flash-attn window_size=(w // 2, 0): w // 2 tokens back plus the current one
        "swa_window": int(window_size) // 2,
        "intermediate_size": int(official["n_inner"]),
        "max_prefix_length": int(enc_length),
        "rms_norm_eps": float(official.get("layer_norm_epsilon", 1e-5)),
        "initializer_range": float(official.get("initializer_range", 0.02)),
        "conv_kernel_size": int(mixer.get("kernel_size", 3)),
        "conv_expand": int(mixer.get("expand_proj", 4)) // 2,
        "rotary_base": float(official.get("rotary_emb_base", 10000.0) or 10000.0),
        "linear_attention_eps": float(alt.get("eps", 1e-12)),
        "tie_word_embeddings": bool(official.get("tie_word_embeddings", True)),
    }
    for name, default in (("bos_token_id", 50256), ("eos_token_id", 50256), ("pad_token_id", 50256),
                          ("mask_token_id", 50263)):
        value = official.get(name, default)
        fields[name] = value if isinstance(value, int) and 0 <= value < vocab else None
    return fields


# --------------------------------------------------------------------------------------------------
# state dict
# --------------------------------------------------------------------------------------------------


def official_key_to_jrt(key: str) -> str | None:
    """The :class:`JRTForCausalLM` name of an official key, or None for keys to drop (metrics).
    Unknown keys are returned unchanged (prefixed ``?``) so that they are reported as unexpected."""
    if "metrics" in key:
        return None
    key = key[len("model."):] if key.startswith("model.") else key
    key = key.replace("conv1", "conv")
    if key in _GLOBAL_KEYS:
        return _GLOBAL_KEYS[key]
    match = _LAYER_KEY.match(key)
    if match is None:
        return "?" + key
    index, rest = match.groups()
    rest = rest.replace("mixer.conv.conv.weight", "mixer.conv.weight")
    return f"model.layers.{index}.{rest}"


def convert_state_dict(
    official: Mapping[str, torch.Tensor], config: JRTConfig, check_tied: bool = True
) -> dict[str, torch.Tensor]:
    """Rename an official state dict to :class:`JRTForCausalLM` names and check it completely.

    Args:
        official: the checkpoint's tensors (``model.`` prefix, metric scalars and ``conv1`` accepted).
        config: the target configuration (e.g. from :func:`official_config_to_jrt`).
        check_tied: with tied embeddings, require ``lm_head.weight`` to equal the embedding (when both exist).

    Returns:
        ``{name: tensor}`` with exactly the keys of ``JRTForCausalLM(config).state_dict()``.

    Raises:
        ValueError: listing every missing, unexpected and mis-shaped tensor (and a tied-weight mismatch).
    """
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in JRTForCausalLM(config).state_dict().items()}
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    duplicates = []
    for key, tensor in official.items():
        name = official_key_to_jrt(key)
        if name is None:
            continue
        if name in converted:
            duplicates.append(f"{key} (also {sources[name]})")
            continue
        converted[name] = tensor
        sources[name] = key
    tied = config.tie_word_embeddings
    if tied and "lm_head.weight" in converted and "model.embeddings.weight" in converted:
        head, emb = converted["lm_head.weight"], converted["model.embeddings.weight"]
        real = head.device.type != "meta" and emb.device.type != "meta"
        if check_tied and real and head.shape == emb.shape and not torch.equal(head, emb):
            raise ValueError(
                "the checkpoint's lm_head.weight differs from the word embeddings although the model ties them"
            )
    if tied and "lm_head.weight" not in converted and "model.embeddings.weight" in converted:
        converted["lm_head.weight"] = converted["model.embeddings.weight"]
        sources["lm_head.weight"] = sources["model.embeddings.weight"]
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(sources[n] for n in set(converted) - set(expected))
    misshaped = sorted(
        f"{sources[n]}: {tuple(converted[n].shape)}, expected {expected[n]}"
        for n in set(converted) & set(expected)
        if tuple(converted[n].shape) != expected[n]
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: " + ", ".join(missing))
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: " + ", ".join(unexpected))
    if misshaped:
        problems.append(f"mis-shaped {len(misshaped)}: " + "; ".join(misshaped))
    if duplicates:
        problems.append("duplicated after renaming: " + ", ".join(duplicates))
    if problems:
        raise ValueError("official checkpoint does not match the configuration: " + " | ".join(problems))
    return {name: converted[name] for name in expected}


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------


def _resolve_source(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{source} is a file; pass the checkpoint folder (config.json + weights)")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        raise FileNotFoundError(f"checkpoint folder not found: {source}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=["config.json", "*.bin", "*.safetensors",
                                                                    "*.index.json"]))
    except Exception as err:
        raise FileNotFoundError(
            f"{source} is neither a local folder nor a reachable Hugging Face Hub repository ({err})"
        ) from err


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    state = read_tensor_file(path)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # a raw Lightning checkpoint
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path.parent} is corrupt: {path.name} does not hold a state dict of tensors")
    return dict(state)


def read_official(source: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``config.json`` and the weights (safetensors, ``pytorch_model.bin`` or a sharded index) of an official
    checkpoint folder or Hub id."""
    folder = _resolve_source(source)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    official_config = read_json_file(config_path, "checkpoint config")
    if not isinstance(official_config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(official_config).__name__}")
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            index = read_json_file(path, "weight index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{path} has no \"weight_map\" object (tensor name -> shard file)")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_load_weights_file(folder / shard))
            return official_config, state
        return official_config, _load_weights_file(path)
    raise FileNotFoundError(f"{folder} holds none of the weight files {', '.join(WEIGHT_FILES)}")


def load_official(
    source: str | Path, dtype: torch.dtype | None = None, **config_overrides: Any
) -> JRTForCausalLM:
    """Build a :class:`JRTForCausalLM` from an official checkpoint folder or Hub id (see module docstring)."""
    official_config, official_state = read_official(source)
    config = official_config_to_jrt(official_config, **config_overrides)
    state = convert_state_dict(official_state, config)
    with torch.device("meta"):
        model = JRTForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embeddings.weight
    model = model.to(dtype=dtype if dtype is not None else torch.float32)
    return model.eval()


def check_output_folder(source: str | Path, out: str | Path) -> None:
    """Refuse an output that would overwrite the source checkpoint (``out`` is ``source`` or inside it) or that
    is an existing file."""
    out_path = Path(out).expanduser().resolve()
    src = Path(source).expanduser()
    if src.is_dir():
        src = src.resolve()
        if out_path == src or src in out_path.parents:
            raise ValueError(f"output {out} is {'the source folder' if out_path == src else 'inside the source'} "
                             f"{source}: choose another folder (the source would be overwritten)")
    if out_path.exists() and not out_path.is_dir():
        raise ValueError(f"output {out} is an existing file, not a folder")


def convert_official(source: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> JRTForCausalLM:
    """Convert an official checkpoint to a ``save_pretrained`` folder ``out`` (safetensors); returns the model.

    Raises:
        ValueError: ``out`` is the source folder, inside it, or an existing file (see :func:`check_output_folder`).
    """
    check_output_folder(source, out)
    model = load_official(source, dtype=dtype)
    model.save_pretrained(str(out))
    return model
