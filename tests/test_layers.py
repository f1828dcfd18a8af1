"""jrt.layers: prefill + step decoding equals one pass, left padding is invisible, shapes and errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import rel_err
from jrt.layers import (
    MIXERS,
    BaseConv,
    BasedLinearAttention,
    CausalAttention,
    PrefixLinearAttention,
    RMSNorm,
    SlidingWindowAttention,
    SwiGLU,
    register_mixer,
)
from jrt.models import JRTConfig

D, H = 32, 4


def config(**fields) -> JRTConfig:
    """A one-layer config of width D with H heads (the fields every mixer reads)."""
    return JRTConfig(**{"vocab_size": 16, "hidden_size": D, "num_attention_heads": H, "feature_dim": 8,
                        "num_hidden_layers": 1, "swa_window": 5, "max_prefix_length": 1024, **fields})


#: The mixers that continue a sequence token by token (the lab's non-causal ones read a whole input at once).
CAUSAL = sorted(name for name, cls in MIXERS.items() if getattr(cls, "causal", True))


def make(name: str) -> torch.nn.Module:
    return MIXERS[name](config(), 0).double()


@pytest.mark.parametrize("name", CAUSAL)
def test_prefill_then_steps_equals_one_pass(name):
    layer = make(name)
    x = torch.randn(2, 20, D, dtype=torch.float64)
    prefix = 7
    full = layer(x, prefix_lengths=torch.tensor([prefix, prefix]))
    state = layer.empty_state(2)
    outs = [layer(x[:, :prefix], state=state)]
    outs += [layer(x[:, i : i + 1], state=state) for i in range(prefix, 20)]
    assert rel_err(torch.cat(outs, 1), full) < 1e-10
    # multi-token continuation chunks
    state = layer.empty_state(2)
    outs = [layer(x[:, :prefix], state=state), layer(x[:, prefix:13], state=state), layer(x[:, 13:], state=state)]
    assert rel_err(torch.cat(outs, 1), full) < 1e-10


@pytest.mark.parametrize("name", CAUSAL)
def test_left_padding_is_invisible(name):
    layer = make(name)
    x = torch.randn(2, 12, D, dtype=torch.float64)
    prefix = torch.tensor([6, 6])
    alone = layer(x, prefix_lengths=prefix)
    padded = torch.cat([torch.randn(2, 3, D, dtype=torch.float64), x], dim=1)
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[:, :3] = 0
    out = layer(padded, attention_mask=mask, prefix_lengths=prefix)
    assert rel_err(out[:, 3:], alone) < 1e-10
    # decoding continues identically after a padded prefill
    state_a, state_p = layer.empty_state(2), layer.empty_state(2)
    layer(x, prefix_lengths=prefix, state=state_a)
    layer(padded, attention_mask=mask, prefix_lengths=prefix, state=state_p)
    step = torch.randn(2, 1, D, dtype=torch.float64)
    assert rel_err(layer(step, state=state_p), layer(step, state=state_a)) < 1e-10


def test_pla_prefix_is_read_non_causally():
    layer = PrefixLinearAttention(config()).double()
    x = torch.randn(1, 10, D, dtype=torch.float64)
    with_prefix = layer(x, prefix_lengths=torch.tensor([10]))
    changed = x.clone()
    changed[:, 9] += 1.0
    # the first output depends on a later prefix token ...
    assert rel_err(layer(changed, prefix_lengths=torch.tensor([10]))[:, 0], with_prefix[:, 0]) > 1e-6
    # ... but not when the prefix is empty (causal)
    causal = layer(x, prefix_lengths=torch.tensor([0]))
    assert rel_err(layer(changed, prefix_lengths=torch.tensor([0]))[:, 0], causal[:, 0]) < 1e-12


def test_pla_default_prefix_is_capped():
    layer = PrefixLinearAttention(config(max_prefix_length=4)).double()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    assert rel_err(layer(x), layer(x, prefix_lengths=torch.tensor([4, 4]))) < 1e-14


def test_state_sizes_match_the_state():
    x = torch.randn(3, 40, D)
    for cls in (BasedLinearAttention, BaseConv, SlidingWindowAttention, CausalAttention):
        layer = cls(config(swa_window=6))
        state = layer.empty_state(3)
        layer(x, state=state)
        assert state.nbytes() == layer.state_size_bytes(3, torch.float32, context_length=40)
    # published 360M PLA layer: H * (Dv * D + D) = 283,920 numbers
    with torch.device("meta"):
        assert PrefixLinearAttention(JRTConfig.from_preset("jrt-360m"), 1).state_size_bytes(1) == 283_920 * 4


def test_registry_builds_every_mixer_from_config_and_layer_index():
    for cls in MIXERS.values():
        layer = cls(config(), 3)
        assert layer.layer_idx == 3 and layer(torch.randn(1, 4, D)).shape == (1, 4, D)
    assert MIXERS["attention"](config(), 0).window is None and MIXERS["swa"](config(), 0).window == 5
    assert register_mixer("based", BasedLinearAttention) is BasedLinearAttention  # idempotent
    with pytest.raises(ValueError, match="already registered"):
        register_mixer("based", BaseConv)
    with pytest.raises(TypeError):
        BasedLinearAttention(config(), 0, impl="chunk")  # no keyword swallowing
    assert BasedLinearAttention(config(ops_impl="reference")).impl == "reference"


def test_swiglu_is_value_then_gate():
    mlp = SwiGLU(8, 16)
    x = torch.randn(3, 8)
    h = x @ mlp.fc1.weight.T
    expected = (torch.nn.functional.silu(h[:, 16:]) * h[:, :16]) @ mlp.fc2.weight.T
    assert rel_err(mlp(x), expected) < 1e-6
    assert RMSNorm is torch.nn.RMSNorm


def test_bad_inputs():
    layer = PrefixLinearAttention(config())
    x = torch.randn(2, 5, D)
    with pytest.raises(ValueError, match="prefix length larger"):
        layer(x, prefix_lengths=torch.tensor([6, 2]))
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="hidden_states"):
        layer(torch.randn(2, 5, D + 1))
    state = layer.empty_state(2)
    layer(x, state=state)
    with pytest.raises(ValueError, match="prefix_lengths must be None or 0"):
        layer(x[:, :1], prefix_lengths=torch.tensor([1, 1]), state=state)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        BasedLinearAttention(SimpleNamespace(hidden_size=30, num_attention_heads=4))
    with pytest.raises(ValueError, match="window"):
        SlidingWindowAttention(SimpleNamespace(hidden_size=D, num_attention_heads=H, swa_window=-1, rotary_base=1e4))
    with pytest.raises(ValueError, match="rotary_base"):
        SlidingWindowAttention(SimpleNamespace(hidden_size=D, num_attention_heads=H, swa_window=4, rotary_base=0.0))


def test_baseconv_matches_torch_conv1d():
    conv = BaseConv(config(conv_kernel_size=3))
    x = torch.randn(2, 11, D)
    u1, u2 = conv.in_proj(x).chunk(2, dim=-1)
    ref = torch.nn.functional.conv1d(u1.transpose(1, 2), conv.conv.weight, padding=2, groups=conv.channels)[..., :11]
    expected = conv.out_proj(torch.nn.functional.silu(ref).transpose(1, 2) * u2)
    assert rel_err(conv(x), expected) < 1e-5


def test_full_attention_fast_path_matches_the_operator():
    from jrt.ops import sliding_window_attention

    layer = CausalAttention(config())
    x = torch.randn(2, 30, D)
    q, k, v = layer.Wqkv(x).unflatten(-1, (3, H, D // H)).unbind(dim=2)
    expected = layer.out_proj(sliding_window_attention(q, k, v, 30, impl="reference").flatten(-2))
    assert rel_err(layer(x), expected) < 1e-5


@pytest.mark.parametrize(
    "field,value,match",
    [("rms_norm_eps", -1e-5, "rms_norm_eps"), ("linear_attention_eps", -1.0, "linear_attention_eps"),
     ("rotary_base", 0.0, "rotary_base"), ("ops_impl", "fast", "ops_impl")],
)
def test_config_rejects_bad_numbers(field, value, match):
    with pytest.raises(ValueError, match=match):
        config(**{field: value})
