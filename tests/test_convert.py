"""Conversion of the authors' checkpoints: names/shapes from the shared TSV, and numerics against a direct
implementation of the official formulas."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err
from jrt import convert_cli
from jrt.models import JRTConfig, JRTForCausalLM
from jrt.models.convert import convert_state_dict, load_official, official_config_to_jrt

TINY_OFFICIAL = {
    "model_type": "gpt2", "vocab_size": 100, "pad_vocab_size_multiple": 8, "n_embd": 32, "n_layer": 4,
    "n_head": 4, "n_inner": 64, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "rms_norm": True,
    "activation_function": "swiglu", "max_position_embeddings": 0, "alt_mixer_layers": [1],
    "alt_mixer_2_layers": [2],
    "mixer": {"_target_": "based.models.mixers.convolution.BaseConv", "use_bias": True, "expand_proj": 4},
    "alt_mixer": {"_target_": "based.models.mixers.prefix_linear_attention.PrefixLinearAttention",
                  "feature_dim": 4, "num_heads": 4, "enc_length": 6},
    "alt_mixer_2": {"_target_": "based.models.mixers.slide_attention.SlidingAttention", "window_size": 8,
                    "num_heads": 4},
}


def run_convert(argv: list[str]) -> int:
    """Run the ``jrt convert`` sub-command alone (independent of the other commands' modules)."""
    parser = argparse.ArgumentParser(prog="jrt")
    convert_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)




def official_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for a config, following the documented naming pattern (checked against the TSV)."""
    d, inner, h = cfg["n_embd"], cfg["n_inner"], cfg["n_head"]
    f = cfg["alt_mixer"]["feature_dim"]
    vocab = math.ceil(cfg["vocab_size"] / cfg["pad_vocab_size_multiple"]) * cfg["pad_vocab_size_multiple"]
    shapes = {"model.transformer.embeddings.word_embeddings.weight": (vocab, d)}
    for i in range(cfg["n_layer"]):
        p = f"model.transformer.layers.{i}."
        if i in cfg["alt_mixer_layers"]:
            mixer = {"proj_q.weight": (h * f, d), "proj_k.weight": (h * f, d), "proj_v.weight": (d, d),
                     "proj_k_enc.weight": (h * f, d), "proj_v_enc.weight": (d, d), "out_proj.weight": (d, d)}
        elif i in cfg["alt_mixer_2_layers"]:
            mixer = {"Wqkv.weight": (3 * d, d), "out_proj.weight": (d, d)}
        else:
            mixer = {"in_proj.weight": (4 * d, d), "in_proj.bias": (4 * d,), "out_proj.weight": (d, 2 * d),
                     "out_proj.bias": (d,), "conv.conv.weight": (2 * d, 1, 3)}
        shapes.update({p + "mixer." + k: v for k, v in mixer.items()})
        shapes.update({p + "norm1.weight": (d,), p + "mlp.fc1.weight": (2 * inner, d),
                       p + "mlp.fc2.weight": (d, inner), p + "norm2.weight": (d,)})
    shapes["model.transformer.ln_f.weight"] = (d,)
    shapes["model.lm_head.weight"] = (vocab, d)
    return shapes


def read_tsv(path) -> dict[str, tuple[tuple[int, ...], str]]:
    rows = {}
    for line in path.read_text().splitlines()[1:]:
        key, shape, dtype = line.split("\t")[:3]
        rows[key] = (tuple(int(s) for s in shape.split(",")) if shape else (), dtype)
    return rows


@pytest.mark.parametrize("name, preset", [("jrt-360m-30b", "jrt-360m"), ("jrt-1b-50b", "jrt-1.3b")])
def test_official_layout_converts_with_no_missing_or_unexpected_keys(shared_data, name, preset):
    tsv = read_tsv(shared_data / "official" / f"{name}.keys.tsv")
    official = json.loads((shared_data / "official" / f"{name}.config.reconstructed.json").read_text())
    config = official_config_to_jrt(official)
    reference = JRTConfig.from_preset(preset)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "mixers",
                  "vocab_size", "swa_window", "max_prefix_length", "feature_dim", "conv_kernel_size"):
        assert getattr(config, field) == getattr(reference, field), field
    # the naming pattern used by the numeric test below reproduces the TSV exactly (keys, order and shapes)
    weights = {k: v[0] for k, v in tsv.items() if "metrics" not in k}
    assert official_shapes({**official, "alt_mixer": {**official["alt_mixer"]}}) == weights
    state = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, (shape, dtype) in tsv.items()}
    converted = convert_state_dict(state, config)
    with torch.device("meta"):
        model = JRTForCausalLM(config)
    result = model.load_state_dict(converted, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    # the same without the Lightning prefix, and with the older conv1 spelling
    respelled = {k.removeprefix("model.").replace("conv.conv", "conv1.conv"): v for k, v in state.items()}
    assert convert_state_dict(respelled, config).keys() == converted.keys()


def test_mismatches_are_listed(shared_data):
    tsv = read_tsv(shared_data / "official" / "jrt-360m-30b.keys.tsv")
    official = json.loads((shared_data / "official" / "jrt-360m-30b.config.reconstructed.json").read_text())
    state = {k: torch.empty(shape, device="meta") for k, (shape, _) in tsv.items()}
    del state["model.transformer.layers.3.mixer.in_proj.bias"]
    state["model.transformer.layers.3.mixer.extra.weight"] = torch.empty(4, device="meta")
    state["model.transformer.layers.1.mixer.proj_q.weight"] = torch.empty(128, 1024, device="meta")
    with pytest.raises(ValueError) as info:
        convert_state_dict(state, official_config_to_jrt(official))
    message = str(info.value)
    assert "missing 1: model.layers.3.mixer.in_proj.bias" in message
    assert "unexpected 1: model.transformer.layers.3.mixer.extra.weight" in message
    assert "model.transformer.layers.1.mixer.proj_q.weight: (128, 1024), expected (256, 1024)" in message
    with pytest.raises(ValueError, match="n_inner"):
        official_config_to_jrt({k: v for k, v in official.items() if k != "n_inner"})


# --------------------------------------------------------------------------------------------------
# direct implementation of the official formulas (flash-attn GPT + Based mixers), float64
# --------------------------------------------------------------------------------------------------


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _taylor(x):  # official TaylorExp: [1, x / d^(1/4), vec(x x^T) / sqrt(2) / sqrt(d)]
    d = x.shape[-1]
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2)
    return torch.cat([x[..., :1] ** 0, x / math.sqrt(math.sqrt(d)), x2 / math.sqrt(d)], dim=-1)


def _rotary(x, base=10000.0):  # x [B, T, H, Dh], rotate-half, positions 0..T-1
    dh = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def official_logits(sd: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    g = {k.removeprefix("model."): v for k, v in sd.items()}
    d, h, inner = cfg["n_embd"], cfg["n_head"], cfg["n_inner"]
    f, enc = cfg["alt_mixer"]["feature_dim"], cfg["alt_mixer"]["enc_length"]
    window = cfg["alt_mixer_2"]["window_size"] // 2
    b, t = ids.shape
    x = g["transformer.embeddings.word_embeddings.weight"][ids]
    for i in range(cfg["n_layer"]):
        p = f"transformer.layers.{i}."
        y = _rms(x, g[p + "norm1.weight"])
        if i in cfg["alt_mixer_layers"]:
            q = (y @ g[p + "mixer.proj_q.weight"].T).view(b, t, h, f).transpose(1, 2)
            k = (y @ g[p + "mixer.proj_k.weight"].T).view(b, t, h, f).transpose(1, 2)
            v = (y @ g[p + "mixer.proj_v.weight"].T).view(b, t, h, d // h).transpose(1, 2)
            m = min(enc, t)
            ke = (y[:, :m] @ g[p + "mixer.proj_k_enc.weight"].T).view(b, m, h, f).transpose(1, 2)
            ve = (y[:, :m] @ g[p + "mixer.proj_v_enc.weight"].T).view(b, m, h, d // h).transpose(1, 2)
            q, k, ke = _taylor(q), _taylor(k), _taylor(ke)
            y1 = torch.tril(q @ k.transpose(-1, -2)) @ v
            y2 = (q @ ke.transpose(-1, -2)) @ ve
            z = (q * (ke.sum(2, keepdim=True) + k.cumsum(2))).sum(-1)
            out = ((y1 + y2) / (z[..., None] + 1e-12)).transpose(1, 2).reshape(b, t, d)
            out = out @ g[p + "mixer.out_proj.weight"].T
        elif i in cfg["alt_mixer_2_layers"]:
            qkv = (y @ g[p + "mixer.Wqkv.weight"].T).view(b, t, 3, h, d // h)
            q, k, v = _rotary(qkv[:, :, 0]), _rotary(qkv[:, :, 1]), qkv[:, :, 2]
            scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d // h)
            idx = torch.arange(t)
            allowed = (idx[None, :] <= idx[:, None]) & (idx[None, :] >= idx[:, None] - window)
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            out = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(b, t, d) @ g[p + "mixer.out_proj.weight"].T
        else:
            u = y @ g[p + "mixer.in_proj.weight"].T + g[p + "mixer.in_proj.bias"]
            u1, u2 = u[..., : 2 * d], u[..., 2 * d :]
            conv_w = g[p + "mixer.conv.conv.weight"]
            conv = F.conv1d(u1.transpose(1, 2), conv_w, padding=2, groups=2 * d)[..., :t]
            out = (F.silu(conv).transpose(1, 2) * u2) @ g[p + "mixer.out_proj.weight"].T + g[p + "mixer.out_proj.bias"]
        x = x + out
        y = _rms(x, g[p + "norm2.weight"]) @ g[p + "mlp.fc1.weight"].T
        value, gate = y[..., :inner], y[..., inner:]
        x = x + (F.silu(gate) * value) @ g[p + "mlp.fc2.weight"].T
    return _rms(x, g["transformer.ln_f.weight"]) @ g["lm_head.weight"].T


def _write_tiny_official(folder, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in official_shapes(TINY_OFFICIAL).items():
        scale = 1.0 if key.endswith("norm1.weight") or key.endswith("norm2.weight") or "ln_f" in key else 0.2
        state[key] = (1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=dtype)) if scale == 1.0 else (
            scale * torch.randn(shape, generator=gen, dtype=dtype))
    state["model.lm_head.weight"] = state["model.transformer.embeddings.word_embeddings.weight"]
    state["train_metrics.num-tokens.count"] = torch.tensor(123)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_OFFICIAL))
    torch.save(state, folder / "pytorch_model.bin")
    return state


def test_converted_tiny_model_reproduces_the_official_formulas(tmp_path):
    state = _write_tiny_official(tmp_path / "official")
    model = load_official(tmp_path / "official", dtype=torch.float64)
    assert model.config.max_prefix_length == 6 and model.config.swa_window == 4
    ids = torch.randint(0, 100, (2, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids, prefix_lengths=6).logits
    expected = official_logits(state, TINY_OFFICIAL, ids)
    assert rel_err(ours, expected) < 1e-10
    with torch.no_grad():  # default prefix: the prompt capped at enc_length, as the official code does
        assert rel_err(model(ids).logits, expected) < 1e-10


def test_convert_command_writes_a_loadable_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    _write_tiny_official(tmp_path / "official", dtype=torch.float32)
    assert run_convert(["convert", "official", str(tmp_path / "official"), str(tmp_path / "hf")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    direct = load_official(tmp_path / "official")
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, direct(ids).logits)
    with pytest.raises(FileNotFoundError, match="not found"):  # jrt.cli.main turns it into exit code 2
        run_convert(["convert", "official", str(tmp_path / "nowhere"), str(tmp_path / "x")])


def test_tied_mismatch_is_an_error(tmp_path):
    state = {k: torch.zeros(s) for k, s in official_shapes(TINY_OFFICIAL).items()}
    state["model.lm_head.weight"] = torch.ones_like(state["model.lm_head.weight"])
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        convert_state_dict(state, official_config_to_jrt(TINY_OFFICIAL))
