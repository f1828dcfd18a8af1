"""jrt.layers: prefill + step decoding equals one pass, left padding is invisible, shapes and errors."""

from __future__ import annotations

import pytest
import torch

from helpers import rel_err
from jrt.layers import (
    MIXERS,
    BaseConv,
    BasedLinearAttention,
    PrefixLinearAttention,
    RMSNorm,
    SlidingWindowAttention,
    SwiGLU,
)

D, H = 32, 4




def make(name: str) -> torch.nn.Module:
    kwargs = {"hidden_size": D, "num_heads": H, "feature_dim": 8}
    if name == "swa":
        kwargs["window"] = 5
    if name == "attention":
        kwargs["window"] = None
    return MIXERS[name](**kwargs).double()


@pytest.mark.parametrize("name", sorted(MIXERS))
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


@pytest.mark.parametrize("name", sorted(MIXERS))
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
    layer = PrefixLinearAttention(D, H, feature_dim=8).double()
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
    layer = PrefixLinearAttention(D, H, feature_dim=8, max_prefix_length=4).double()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    assert rel_err(layer(x), layer(x, prefix_lengths=torch.tensor([4, 4]))) < 1e-14


def test_state_sizes_match_the_state():
    x = torch.randn(3, 40, D)
    for layer in (BasedLinearAttention(D, H, feature_dim=8), BaseConv(D), SlidingWindowAttention(D, H, window=6)):
        state = layer.empty_state(3)
        layer(x, state=state)
        assert state.nbytes() == layer.state_size_bytes(3)
    # published 360M PLA layer: H * (Dv * D + D) = 283,920 numbers
    assert PrefixLinearAttention(1024, 16, device="meta").state_size_bytes(1) == 283_920 * 4


def test_swiglu_is_value_then_gate():
    mlp = SwiGLU(8, 16)
    x = torch.randn(3, 8)
    h = x @ mlp.fc1.weight.T
    expected = (torch.nn.functional.silu(h[:, 16:]) * h[:, :16]) @ mlp.fc2.weight.T
    assert rel_err(mlp(x), expected) < 1e-6
    assert RMSNorm is torch.nn.RMSNorm


def test_bad_inputs():
    layer = PrefixLinearAttention(D, H, feature_dim=8)
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
        BasedLinearAttention(30, 4)
    with pytest.raises(ValueError, match="window"):
        SlidingWindowAttention(D, H, window=-1)


def test_baseconv_matches_torch_conv1d():
    conv = BaseConv(D, kernel_size=3)
    x = torch.randn(2, 11, D)
    u1, u2 = conv.in_proj(x).chunk(2, dim=-1)
    ref = torch.nn.functional.conv1d(u1.transpose(1, 2), conv.conv.weight, padding=2, groups=conv.channels)[..., :11]
    expected = conv.out_proj(torch.nn.functional.silu(ref).transpose(1, 2) * u2)
    assert rel_err(conv(x), expected) < 1e-5


def test_full_attention_fast_path_matches_the_operator():
    from jrt.ops import sliding_window_attention

    layer = SlidingWindowAttention(D, H, window=None)
    x = torch.randn(2, 30, D)
    q, k, v = layer.Wqkv(x).unflatten(-1, (3, H, D // H)).unbind(dim=2)
    expected = layer.out_proj(sliding_window_attention(q, k, v, 30, impl="reference").flatten(-2))
    assert rel_err(layer(x), expected) < 1e-5
