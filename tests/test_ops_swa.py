"""Sliding-window attention: blocked form and decode ring buffer against the full reference."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import rel_err
from jrt.ops import RingBuffer, apply_rotary, sliding_window_attention, sliding_window_decode_step


def qkv(b, t, h, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, h, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


def naive_swa(q, k, v, window):
    """A loop over positions: softmax over keys i-window..i after rotary at positions 0..T-1."""
    b, t, h, d = q.shape
    pos = torch.arange(t).expand(b, t)
    q, k = apply_rotary(q, pos), apply_rotary(k, pos)
    out = torch.empty_like(v)
    for i in range(t):
        lo = max(0, i - window)
        scores = torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, lo : i + 1]) / math.sqrt(d)
        out[:, i] = torch.einsum("bhj,bjhd->bhd", scores.softmax(-1), v[:, lo : i + 1])
    return out


@pytest.mark.parametrize("t,window", [(1, 4), (30, 0), (50, 7), (129, 16), (200, 40)])
@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_swa_matches_naive_loop(t, window, impl):
    q, k, v = qkv(2, t, 2, 8, seed=t)
    assert rel_err(sliding_window_attention(q, k, v, window, impl=impl), naive_swa(q, k, v, window)) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_swa_low_precision(dtype, tol):
    q, k, v = qkv(1, 150, 2, 16, dtype=dtype, seed=1)
    ref = naive_swa(q.double(), k.double(), v.double(), 32)
    out = sliding_window_attention(q, k, v, 32, impl="chunk")
    assert out.dtype == dtype and rel_err(out, ref) < tol


@pytest.mark.parametrize("side", ["left", "right"])
def test_swa_padding_equals_single_sequences(side):
    lengths, window = [70, 33, 5], 12
    singles = [qkv(1, t, 2, 8, seed=t) for t in lengths]
    t_max = max(lengths)
    batch = [torch.full((3, t_max, 2, 8), 3.0, dtype=torch.float64) for _ in range(3)]
    mask = torch.zeros(3, t_max, dtype=torch.long)
    for b, (single, t) in enumerate(zip(singles, lengths)):
        sl = slice(t_max - t, t_max) if side == "left" else slice(0, t)
        for x, s in zip(batch, single):
            x[b, sl] = s[0]
        mask[b, sl] = 1
    out = sliding_window_attention(*batch, window, attention_mask=mask, impl="chunk")
    for b, single in enumerate(singles):
        ref = sliding_window_attention(*single, window, impl="reference")
        assert rel_err(out[b, mask[b].bool()], ref[0]) < 1e-12


def test_ring_buffer_decoding_matches_full_pass():
    window, t_prompt, t_total = 6, 11, 25
    q, k, v = qkv(2, t_total, 2, 8, seed=5)
    mask = torch.ones(2, t_prompt, dtype=torch.long)
    mask[1, :4] = 0  # second prompt left-padded: 7 real tokens
    full0 = sliding_window_attention(q[:1], k[:1], v[:1], window)
    full1 = sliding_window_attention(q[1:, 4:], k[1:, 4:], v[1:, 4:], window)
    cache = RingBuffer.empty(2, window, 2, 8, torch.float64, "cpu")
    pos = torch.stack([torch.arange(t_prompt), (torch.arange(t_prompt) - 4).clamp_min(0)])
    cache.write(apply_rotary(k[:, :t_prompt], pos), v[:, :t_prompt], mask)
    assert cache.length.tolist() == [t_prompt, t_prompt - 4]
    for i in range(t_prompt, t_total):
        o = sliding_window_decode_step(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], cache)
        assert rel_err(o[0, 0], full0[0, i]) < 1e-12
        assert rel_err(o[1, 0], full1[0, i - 4]) < 1e-12
    assert cache.nbytes() < 10_000  # constant in context length: window + 1 slots


def test_swa_errors():
    q, k, v = qkv(1, 8, 1, 4)
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, k, v, -1)
    with pytest.raises(ValueError, match="even head dimension"):
        sliding_window_attention(q[..., :3], k[..., :3], v[..., :3], 2)
    with pytest.raises(ValueError, match="unknown impl"):
        sliding_window_attention(q, k, v, 2, impl="recurrent")
