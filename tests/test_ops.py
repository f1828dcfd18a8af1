"""jrt.ops: every fast form against the plain reference, state handoff, prefix semantics, padding, errors."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import rel_err
from jrt.ops import (
    IMPL_ENV,
    compress_state,
    expand_state,
    feature_dim,
    linear_attention,
    prefix_linear_attention,
    resolve_impl,
    taylor_feature_map,
    taylor_kernel,
)

chunk = importlib.import_module("jrt.ops.based.chunk")
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}




def make_qkv(b, t, h, f, dv, dtype=torch.float64, seed=0, enc=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, t, h, f), (b, t, h, f), (b, t, h, dv)] + ([(b, t, h, f), (b, t, h, dv)] if enc else [])
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


@pytest.fixture
def small_segments(monkeypatch):
    """Small chunks and segments so that short test sequences cross several chunk and segment boundaries."""
    monkeypatch.setattr(chunk, "CHUNK_SIZE", 16)
    monkeypatch.setattr(chunk, "SEGMENT_SIZE", 48)


# ------------------------------------------------------------------------------------------ feature map


@pytest.mark.parametrize("f", [1, 4, 16])
@pytest.mark.parametrize("compressed", [False, True])
def test_feature_map_gives_taylor_kernel(f, compressed):
    q, k = torch.randn(7, f, dtype=torch.float64), torch.randn(7, f, dtype=torch.float64)
    phi_q, phi_k = taylor_feature_map(q, compressed), taylor_feature_map(k, compressed)
    assert phi_q.shape == (7, feature_dim(f, compressed))
    expected = taylor_kernel((q * k).sum(-1) / f**0.5)
    assert rel_err((phi_q * phi_k).sum(-1), expected) < 1e-13


def test_feature_map_dims():
    assert feature_dim(16) == 273 and feature_dim(16, compressed=True) == 153
    assert taylor_feature_map(torch.randn(2, 3, 16)).shape == (2, 3, 273)
    assert taylor_feature_map(torch.randn(2, 3, 16), compressed=True).shape == (2, 3, 153)


def test_compressed_state_round_trip():
    f = 5
    k, v, q = torch.randn(9, f).double(), torch.randn(9, 3).double(), torch.randn(4, f).double()
    full = taylor_feature_map(k).T @ v
    small = compress_state(full, f)
    assert rel_err(taylor_feature_map(q, True) @ small, taylor_feature_map(q) @ full) < 1e-13
    assert rel_err(expand_state(small, f), full) < 1e-13


def test_chunked_running_state_is_the_compressed_space():
    """The chunked form's running state is the public compressed state scaled by the map's weights, its rows in
    the diagonal order: reading it with the query features equals phi(q) . S, and the conversions are inverse."""
    from jrt.ops.feature_map import monomials

    f = 5
    g = torch.Generator().manual_seed(3)
    k, v, q = (torch.randn(30, n, generator=g, dtype=torch.float64) for n in (f, 4, f))
    full = taylor_feature_map(k).T @ v  # [D, Dv]
    internal = chunk.to_internal(full, f)
    assert rel_err(chunk.features(q.T).T @ internal, taylor_feature_map(q) @ full) < 1e-13
    assert rel_err(chunk.to_full(internal, f), full) < 1e-13
    order = chunk.diagonal_order(f)
    weighted = compress_state(full, f) * chunk.monomial_weights(f, torch.float64)[:, None]
    assert rel_err(internal, weighted[order]) < 1e-15
    assert torch.equal(chunk.features(q.T).T, monomials(q)[:, order])


@pytest.mark.parametrize("halve", [False, True])
def test_chunk_features_and_their_backward(halve):
    """The diagonal-order features equal the monomials (squares halved on request), written in place or not,
    and their hand-written backward passes gradcheck."""
    from jrt.ops.feature_map import monomials

    f = 6
    x = torch.randn(3, 7, f, dtype=torch.float64)
    expected = monomials(x)[..., chunk.diagonal_order(f)]
    if halve:
        expected[..., 1 + f : 1 + 2 * f] *= 0.5
    xt = x.transpose(-1, -2)
    out = torch.full((3, feature_dim(f, True), 7), float("nan"), dtype=torch.float64)
    assert rel_err(chunk.features(xt, halve=halve).transpose(-1, -2), expected) < 1e-15
    assert chunk.features(xt, halve=halve, out=out) is out and rel_err(out.transpose(-1, -2), expected) < 1e-15
    assert torch.autograd.gradcheck(lambda y: chunk.features(y, halve=halve), xt.clone().requires_grad_())


def test_exclusive_prefix_and_its_backward():
    start = torch.randn(2, 3, 4, dtype=torch.float64)
    states = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    before, final = chunk.exclusive_prefix(start, states)
    expected = start[:, None] + torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], 1).cumsum(1)
    assert rel_err(before, expected) < 1e-14 and rel_err(final, start + states.sum(1)) < 1e-14
    inputs = (start.clone().requires_grad_(), states.clone().requires_grad_())
    assert torch.autograd.gradcheck(chunk.exclusive_prefix, inputs)


def test_feature_map_rejects_integers():
    with pytest.raises(ValueError, match="floating-point"):
        taylor_feature_map(torch.ones(3, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------ linear attention


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
@pytest.mark.parametrize("t,h,f,dv", [(1, 2, 4, 3), (37, 1, 16, 8), (100, 3, 8, 5)])
def test_linear_attention_matches_reference(small_segments, dtype, impl, t, h, f, dv):
    q, k, v = make_qkv(2, t, h, f, dv, dtype, seed=t + h)
    ref, (s_ref, z_ref) = linear_attention(q.double(), k.double(), v.double(), impl="reference",
                                           output_final_state=True)
    o, (s, z) = linear_attention(q, k, v, impl=impl, output_final_state=True)
    assert o.dtype == dtype and o.shape == (2, t, h, dv)
    assert s.shape == (2, h, feature_dim(f), dv) and z.shape == (2, h, feature_dim(f))
    assert s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(o, ref) < TOL[dtype]
    assert rel_err(s, s_ref) < TOL[dtype] and rel_err(z, z_ref) < TOL[dtype]


@pytest.mark.parametrize("impl", ["reference", "chunk", "recurrent"])
def test_state_handoff_equals_whole_sequence(small_segments, impl):
    q, k, v = make_qkv(2, 90, 2, 8, 6, seed=3)
    whole, (s_whole, z_whole) = linear_attention(q, k, v, impl=impl, output_final_state=True)
    o1, state = linear_attention(q[:, :41], k[:, :41], v[:, :41], impl=impl, output_final_state=True)
    o2, (s, z) = linear_attention(q[:, 41:], k[:, 41:], v[:, 41:], impl=impl, initial_state=state,
                                  output_final_state=True)
    assert rel_err(torch.cat([o1, o2], 1), whole) < 1e-10
    assert rel_err(s, s_whole) < 1e-10 and rel_err(z, z_whole) < 1e-10


def test_decoding_token_by_token_matches_prefill():
    q, k, v = make_qkv(3, 20, 2, 4, 5, torch.float32, seed=5)
    full, _ = linear_attention(q, k, v, impl="chunk")
    out, state = [], None
    for i in range(20):
        o, state = linear_attention(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], initial_state=state,
                                    output_final_state=True)
        out.append(o)
    assert rel_err(torch.cat(out, 1), full) < 1e-5


def test_no_final_state_unless_asked():
    q, k, v = make_qkv(1, 5, 1, 4, 4)
    assert linear_attention(q, k, v)[1] is None


# ------------------------------------------------------------------------------------------ prefix linear attention


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
def test_prefix_matches_reference(small_segments, dtype, impl):
    t = 70
    q, k, v, ke, ve = make_qkv(4, t, 2, 8, 5, dtype, seed=11, enc=True)
    lengths = torch.tensor([0, 1, 33, t])
    args = [x.double() for x in (q, k, v, ke, ve)]
    ref, (s_ref, z_ref) = prefix_linear_attention(*args, lengths, impl="reference", output_final_state=True)
    o, (s, z) = prefix_linear_attention(q, k, v, ke, ve, lengths, impl=impl, output_final_state=True)
    assert o.dtype == dtype
    assert rel_err(o, ref) < TOL[dtype]
    assert rel_err(s, s_ref) < TOL[dtype] and rel_err(z, z_ref) < TOL[dtype]


def test_prefix_reference_is_the_formula():
    """The reference itself, against a direct loop over positions of the formula in docs/design.md."""
    q, k, v, ke, ve = make_qkv(1, 9, 1, 3, 2, seed=2, enc=True)
    m, eps = 4, 1e-6
    phi = taylor_feature_map
    o, _ = prefix_linear_attention(q, k, v, ke, ve, torch.tensor([m]), impl="reference", eps=eps)
    s_enc = sum(phi(ke[0, j, 0])[:, None] * ve[0, j, 0][None] for j in range(m))
    z_enc = sum(phi(ke[0, j, 0]) for j in range(m))
    for i in range(9):
        s_i = sum(phi(k[0, j, 0])[:, None] * v[0, j, 0][None] for j in range(i + 1)) + s_enc
        z_i = sum(phi(k[0, j, 0]) for j in range(i + 1)) + z_enc
        expected = phi(q[0, i, 0]) @ s_i / (phi(q[0, i, 0]) @ z_i + eps)
        assert rel_err(o[0, i, 0], expected) < 1e-12


@pytest.mark.parametrize("impl", ["reference", "chunk", "recurrent"])
def test_prefix_zero_equals_linear_attention(impl):
    q, k, v, ke, ve = make_qkv(2, 30, 2, 4, 3, seed=4, enc=True)
    o, s = prefix_linear_attention(q, k, v, ke, ve, torch.zeros(2, dtype=torch.long), impl=impl,
                                   output_final_state=True)
    ref, s_ref = linear_attention(q, k, v, impl=impl, output_final_state=True)
    assert rel_err(o, ref) < 1e-12 and rel_err(s[0], s_ref[0]) < 1e-12


def test_prefix_state_is_decoding_state():
    """Prefill with a prefix, then decode: the same as linear attention continuing from (S_T + S_enc)."""
    q, k, v, ke, ve = make_qkv(2, 25, 2, 4, 3, seed=6, enc=True)
    lengths = torch.tensor([10, 25])
    _, state = prefix_linear_attention(q[:, :20], k[:, :20], v[:, :20], ke[:, :20], ve[:, :20],
                                       lengths.clamp_max(20), output_final_state=True)
    dec, _ = linear_attention(q[:, 20:], k[:, 20:], v[:, 20:], initial_state=state, impl="recurrent")
    # the same positions computed by the reference over the whole sequence with the same prefix
    ref, _ = prefix_linear_attention(q, k, v, ke, ve, lengths.clamp_max(20), impl="reference")
    assert rel_err(dec, ref[:, 20:]) < 1e-12


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
def test_prefix_is_non_causal_inside_and_causal_after(impl):
    t, m = 24, 10
    q, k, v, ke, ve = make_qkv(1, t, 2, 4, 3, seed=8, enc=True)
    lengths = torch.tensor([m])
    base, _ = prefix_linear_attention(q, k, v, ke, ve, lengths, impl=impl)
    for j in (3, m - 1):  # inside the prefix: earlier positions see the change
        ke2, ve2 = ke.clone(), ve.clone()
        ke2[:, j] += 1.0
        ve2[:, j] += 1.0
        out, _ = prefix_linear_attention(q, k, v, ke2, ve2, lengths, impl=impl)
        assert (out[:, :j] - base[:, :j]).abs().max() > 1e-6
    for j in (m, 17):  # after the prefix: no earlier position changes
        k2, v2, ke2, ve2 = k.clone(), v.clone(), ke.clone(), ve.clone()
        for x in (k2, v2, ke2, ve2):
            x[:, j] += 1.0
        out, _ = prefix_linear_attention(q, k2, v2, ke2, ve2, lengths, impl=impl)
        assert torch.equal(out[:, :j], base[:, :j])
        assert (out[:, j:] - base[:, j:]).abs().max() > 1e-6


# ------------------------------------------------------------------------------------------ padding


def _pad_batch(seqs, side):
    """Stack [T_b, ...] tensors into a padded batch; padding holds large garbage so leaks would show."""
    t = max(s.shape[0] for s in seqs)
    out = torch.full((len(seqs), t, *seqs[0].shape[1:]), 7.0, dtype=seqs[0].dtype)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(t - s.shape[0], t) if side == "left" else slice(0, s.shape[0])
        out[b, sl], mask[b, sl] = s, 1
    return out, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("impl", ["reference", "chunk", "recurrent"])
def test_padded_batch_equals_single_sequences(small_segments, side, impl):
    lengths, prefixes = [19, 40, 7], [5, 40, 0]
    singles = [make_qkv(1, t, 2, 4, 3, seed=20 + t, enc=True) for t in lengths]
    padded = [_pad_batch([s[i][0] for s in singles], side) for i in range(5)]
    mask = padded[0][1]
    tensors = [p[0] for p in padded]
    o, state = prefix_linear_attention(*tensors, torch.tensor(prefixes), attention_mask=mask, impl=impl,
                                       output_final_state=True)
    o_causal, state_causal = linear_attention(*tensors[:3], attention_mask=mask, impl=impl,
                                              output_final_state=True)
    for b, (single, m) in enumerate(zip(singles, prefixes)):
        keep = mask[b].bool()
        ref, ref_state = prefix_linear_attention(*single, torch.tensor([m]), impl=impl, output_final_state=True)
        assert rel_err(o[b, keep], ref[0]) < 1e-12
        assert rel_err(state[0][b], ref_state[0][0]) < 1e-12 and rel_err(state[1][b], ref_state[1][0]) < 1e-12
        ref_c, ref_c_state = linear_attention(*single[:3], impl=impl, output_final_state=True)
        assert rel_err(o_causal[b, keep], ref_c[0]) < 1e-12
        assert rel_err(state_causal[0][b], ref_c_state[0][0]) < 1e-12


# ------------------------------------------------------------------------------------------ gradients


def test_gradcheck_chunked_linear_attention(small_segments):
    q, k, v = make_qkv(1, 20, 1, 2, 2, seed=30)
    s0 = torch.rand(1, 1, feature_dim(2), 2, dtype=torch.float64)
    z0 = torch.rand(1, 1, feature_dim(2), dtype=torch.float64) + 1.0
    inputs = [x.requires_grad_() for x in (q, k, v, s0, z0)]

    def fn(q, k, v, s0, z0):
        o, (s, z) = linear_attention(q, k, v, initial_state=(s0, z0), output_final_state=True, impl="chunk")
        return o, s, z

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_chunked_prefix_linear_attention(small_segments):
    q, k, v, ke, ve = make_qkv(2, 18, 1, 2, 2, seed=31, enc=True)
    s0 = torch.rand(2, 1, feature_dim(2), 2, dtype=torch.float64)
    z0 = torch.rand(2, 1, feature_dim(2), dtype=torch.float64) + 1.0
    inputs = [x.requires_grad_() for x in (q, k, v, ke, ve, s0, z0)]
    lengths = torch.tensor([5, 18])

    def fn(q, k, v, ke, ve, s0, z0):
        o, (s, z) = prefix_linear_attention(q, k, v, ke, ve, lengths, initial_state=(s0, z0),
                                            output_final_state=True, impl="chunk")
        return o, s, z

    assert torch.autograd.gradcheck(fn, inputs)


# ------------------------------------------------------------------------------------------ properties


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3), t=st.integers(1, 80), h=st.integers(1, 3), f=st.integers(1, 6),
    dv=st.integers(1, 5), data=st.data(),
)
def test_property_chunk_equals_reference(b, t, h, f, dv, data):
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, t), min_size=b, max_size=b)))
    seed = data.draw(st.integers(0, 2**16))
    q, k, v, ke, ve = make_qkv(b, t, h, f, dv, seed=seed, enc=True)
    ref, s_ref = prefix_linear_attention(q, k, v, ke, ve, lengths, impl="reference", output_final_state=True)
    o, s = prefix_linear_attention(q, k, v, ke, ve, lengths, impl="chunk", output_final_state=True)
    assert rel_err(o, ref) < 1e-10 and rel_err(s[0], s_ref[0]) < 1e-10


# ------------------------------------------------------------------------------------------ dispatch and errors


def test_auto_dispatch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(IMPL_ENV, raising=False)
    from jrt.ops.based import native

    assert resolve_impl("auto", cpu, 1000) == ("native" if native.available() else "chunk")
    assert resolve_impl("auto", cpu, 1) == "recurrent"
    assert resolve_impl("reference", cpu, 1000) == "reference"
    monkeypatch.setenv(IMPL_ENV, "reference")
    assert resolve_impl("auto", cpu, 1000) == "reference"
    monkeypatch.setenv(IMPL_ENV, "bogus")
    with pytest.raises(ValueError, match="unknown impl"):
        resolve_impl("auto", cpu, 10)


def _bad_calls():
    q, k, v, ke, ve = make_qkv(2, 6, 2, 4, 3, torch.float32, enc=True)
    d = feature_dim(4)
    good_state = (torch.zeros(2, 2, d, 3), torch.zeros(2, 2, d))
    return [
        ("agree on batch, length and heads", lambda: linear_attention(q, k[:, :, :1], v)),
        ("agree on batch", lambda: linear_attention(q, k, v[:1])),
        ("floating-point", lambda: linear_attention(q.long(), k, v)),
        ("4 dimensions", lambda: linear_attention(q[0], k[0], v[0])),
        ("B >= 1", lambda: linear_attention(q[:0], k[:0], v[:0])),
        ("initial_state must be", lambda: linear_attention(q, k, v, initial_state=(good_state[0][:, :, :5],
                                                                                  good_state[1]))),
        ("initial_state must be a pair", lambda: linear_attention(q, k, v, initial_state=good_state[0])),
        ("unknown impl", lambda: linear_attention(q, k, v, impl="fast")),
        ("larger than the sequence", lambda: prefix_linear_attention(q, k, v, ke, ve, torch.tensor([7, 1]))),
        (">= 0", lambda: prefix_linear_attention(q, k, v, ke, ve, torch.tensor([-1, 1]))),
        ("integer tensor", lambda: prefix_linear_attention(q, k, v, ke, ve, torch.tensor([1.0, 2.0]))),
        ("shape \\[B\\]", lambda: prefix_linear_attention(q, k, v, ke, ve, torch.tensor([1, 2, 3]))),
        ("k_enc/v_enc", lambda: prefix_linear_attention(q, k, v, ke[:, :3], ve, torch.tensor([1, 2]))),
        ("attention_mask must have shape", lambda: linear_attention(q, k, v, attention_mask=torch.ones(2, 5))),
        ("only 0", lambda: linear_attention(q, k, v, attention_mask=torch.full((2, 6), 2))),
        ("larger than the sequence", lambda: prefix_linear_attention(
            q, k, v, ke, ve, torch.tensor([4, 1]), attention_mask=torch.tensor([[0, 0, 0, 1, 1, 1]] * 2))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_value_error(case):
    match, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("impl", ["chunk", "recurrent", "reference"])
def test_operators_ignore_autocast(impl):
    """Under bf16 autocast (training and validation loops) the ops keep their own float32 accumulation."""
    q, k, v, ke, ve = make_qkv(2, 40, 2, 4, 3, torch.float32, seed=9, enc=True)
    ref, _ = prefix_linear_attention(q, k, v, ke, ve, torch.tensor([5, 17]), impl=impl)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = prefix_linear_attention(q, k, v, ke, ve, torch.tensor([5, 17]), impl=impl)
        causal, _ = linear_attention(q, k, v, impl=impl)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-6
    assert rel_err(causal, linear_attention(q, k, v, impl="reference")[0]) < 1e-4


@pytest.mark.parametrize("no_autograd", [torch.no_grad, torch.inference_mode])
def test_chunked_form_with_several_threads(small_segments, no_autograd):
    """With several torch threads the chunked form runs independent head blocks in a thread pool, also under
    ``torch.inference_mode()`` (as ``generate()`` runs), whose tensors only inference-mode threads may write."""
    q, k, v, ke, ve = make_qkv(2, 100, 3, 4, 5, seed=12, enc=True)
    lengths = torch.tensor([30, 0])
    ref, s_ref = prefix_linear_attention(q, k, v, ke, ve, lengths, impl="reference", output_final_state=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with no_autograd():
            out, s = prefix_linear_attention(q, k, v, ke, ve, lengths, impl="chunk", output_final_state=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    assert rel_err(out, ref) < 1e-10 and rel_err(s[0], s_ref[0]) < 1e-10


def test_first_call_in_inference_mode_then_autograd():
    """Cached index tensors made during an inference-mode call must not break a later autograd call."""
    q, k, v = make_qkv(1, 20, 1, 7, 2, torch.float32, seed=40)
    with torch.inference_mode():
        linear_attention(q, k, v, impl="chunk", output_final_state=True)
    q.requires_grad_(True)
    o, (s, z) = linear_attention(q, k, v, impl="chunk", output_final_state=True)
    (o.sum() + s.sum()).backward()
    assert q.grad is not None and q.grad.isfinite().all()


@pytest.mark.parametrize("t,h", [(100, 3), (37, 5), (7, 2)])
def test_inference_form_divides_like_the_differentiable_form(small_segments, t, h):
    """The inference form (blocks of heads, in-place features, division fused into the pass) against the
    differentiable form, with an initial state, an encoder and a length that is not a multiple of the chunk."""
    chunk_inference = importlib.import_module("jrt.ops.based.chunk_inference")
    b, f, dv = 2, 4, 5
    g = torch.Generator().manual_seed(t * h)
    q, k, ke = (torch.randn(b, h, t, f, generator=g, dtype=torch.float64) for _ in range(3))
    v1, ve1 = (torch.randn(b, h, t, dv + 1, generator=g, dtype=torch.float64) for _ in range(2))
    state0 = torch.randn(b, h, feature_dim(f), dv + 1, generator=g, dtype=torch.float64)
    o1, s = chunk.forward(q, k, v1, state0, (ke, ve1))
    o1_inf, s_inf = chunk_inference.forward(q, k, v1, state0, (ke, ve1))
    o, s_div = chunk_inference.forward(q, k, v1, state0, (ke, ve1), eps=0.5)
    assert rel_err(o1_inf, o1) < 1e-12 and rel_err(s_inf, s) < 1e-12 and rel_err(s_div, s) < 1e-12
    expected = (o1[..., :-1] / (o1[..., -1:] + 0.5)).transpose(1, 2)
    assert o.shape == (b, t, h, dv) and rel_err(o, expected) < 1e-12


def test_chunk_divide_and_its_backward():
    o1 = torch.rand(2, 3, 5, 4, dtype=torch.float64) + 0.5
    expected = (o1[..., :-1] / (o1[..., -1:] + 0.25)).transpose(1, 2)
    assert rel_err(chunk.divide(o1, 0.25), expected) < 1e-15 and chunk.divide(o1, 0.25).is_contiguous()
    assert torch.autograd.gradcheck(lambda x: chunk.divide(x, 0.25), o1.clone().requires_grad_())


# ------------------------------------------------------------------------------------------ grouped-query heads


def _grouped_inputs(t, seed, groups=3, hkv=2, enc=False):
    """``q [2, t, groups*hkv, 4]`` and key/value-head tensors ``k, v (, ke, ve) [2, t, hkv, *]``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, t, groups * hkv, 4, generator=g, dtype=torch.float64)
    kv = [torch.randn(2, t, hkv, d, generator=g, dtype=torch.float64) for d in ((4, 5, 4, 5) if enc else (4, 5))]
    return q, kv


def _rep(x, groups, dim=2):
    return x.repeat_interleave(groups, dim=dim)


@pytest.mark.parametrize("impl", ["reference", "chunk", "recurrent"])
@pytest.mark.parametrize("t", [1, 9])
def test_grouped_heads_equal_repeated_heads(small_segments, impl, t):
    """Key/value heads shared by groups of query heads: the same outputs as the repeated heads, and one state per
    key/value head (equal to each query head's state of the repeated call), with and without a carried state,
    padding and a prefix."""
    groups = 3
    q, (k, v, ke, ve) = _grouped_inputs(t, seed=50 + t, groups=groups, enc=True)
    g = torch.Generator().manual_seed(7)
    s0 = (torch.randn(2, 2, feature_dim(4), 5, generator=g, dtype=torch.float64),
          torch.rand(2, 2, feature_dim(4), generator=g, dtype=torch.float64) + 1)
    s0_rep = (_rep(s0[0], groups, 1), _rep(s0[1], groups, 1))
    mask = None if t == 1 else torch.tensor([[0, 0] + [1] * (t - 2), [1] * t], dtype=torch.bool)
    o, s = linear_attention(q, k, v, initial_state=s0, output_final_state=True, attention_mask=mask, impl=impl)
    o_ref, s_ref = linear_attention(q, _rep(k, groups), _rep(v, groups), initial_state=s0_rep,
                                    output_final_state=True, attention_mask=mask, impl=impl)
    assert s[0].shape == (2, 2, feature_dim(4), 5) and s[1].shape == (2, 2, feature_dim(4))
    assert rel_err(o, o_ref) < 1e-10
    assert rel_err(_rep(s[0], groups, 1), s_ref[0]) < 1e-10 and rel_err(_rep(s[1], groups, 1), s_ref[1]) < 1e-10
    lengths = torch.tensor([min(3, t), t])
    o, s = prefix_linear_attention(q, k, v, ke, ve, lengths, output_final_state=True, impl=impl)
    o_ref, s_ref = prefix_linear_attention(q, _rep(k, groups), _rep(v, groups), _rep(ke, groups), _rep(ve, groups),
                                           lengths, output_final_state=True, impl=impl)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(_rep(s[0], groups, 1), s_ref[0]) < 1e-10


def test_grouped_heads_must_divide():
    q, (k, v) = _grouped_inputs(3, seed=1, groups=1, hkv=3)
    with pytest.raises(ValueError, match="multiple of k's"):
        linear_attention(q[:, :, :2], k, v)


def test_grouped_sliding_window_equals_repeated():
    """The window operator and its decoding step with key/value heads shared by groups of query heads."""
    from jrt.ops import RingBuffer, sliding_window_attention, sliding_window_decode_step

    groups = 3
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 12, 6, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 12, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    full = sliding_window_attention(q, k, v, 4, rotary_base=None)
    assert rel_err(full, sliding_window_attention(q, _rep(k, groups), _rep(v, groups), 4, rotary_base=None)) < 1e-12
    ring = RingBuffer.empty(2, 4, 2, 8, torch.float64, q.device).write(k[:, :8], v[:, :8])
    ring_rep = RingBuffer.empty(2, 4, 6, 8, torch.float64, q.device).write(_rep(k[:, :8], groups),
                                                                          _rep(v[:, :8], groups))
    for i in range(8, 12):
        step = sliding_window_decode_step(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], ring, rotary_base=None)
        step_rep = sliding_window_decode_step(q[:, i:i + 1], _rep(k[:, i:i + 1], groups),
                                              _rep(v[:, i:i + 1], groups), ring_rep, rotary_base=None)
        assert rel_err(step, step_rep) < 1e-12 and rel_err(step, full[:, i:i + 1]) < 1e-12
