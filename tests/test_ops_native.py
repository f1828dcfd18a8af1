"""The native CPU kernel (``impl="native"``) against the float64 reference: shapes that cross and miss chunk
boundaries, padding, prefixes, state handoff, grouped heads, strided inputs, threads, and the fallbacks."""

from __future__ import annotations

import pytest
import torch

from helpers import rel_err
from jrt.ops import linear_attention, prefix_linear_attention, resolve_impl
from jrt.ops.based import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def qkv(b: int, t: int, h: int, f: int, dv: int, seed: int, hkv: int | None = None, enc: bool = False):
    hkv = hkv or h
    shapes = [(b, t, h, f), (b, t, hkv, f), (b, t, hkv, dv)] + ([(b, t, hkv, f), (b, t, hkv, dv)] if enc else [])
    return [randn(*s, seed=seed + i) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("t", [1, 5, 64, 65, 200])
@pytest.mark.parametrize(("f", "dv"), [(16, 64), (4, 5), (1, 1), (8, 100), (16, 48)])
def test_linear_attention_matches_reference(t, f, dv):
    q, k, v = qkv(2, t, 3, f, dv, seed=t * 7 + f + dv)
    ref, (s_ref, z_ref) = linear_attention(q, k, v, impl="reference", output_final_state=True)
    o, (s, z) = linear_attention(q.float(), k.float(), v.float(), impl="native", output_final_state=True)
    assert o.dtype == torch.float32 and s.dtype == torch.float32 and o.shape == ref.shape
    assert rel_err(o, ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5 and rel_err(z, z_ref) < 1e-5


def test_bfloat16_inputs_compute_in_float32():
    q, k, v = (x.to(torch.bfloat16) for x in qkv(1, 90, 2, 16, 32, seed=3))
    ref, _ = linear_attention(q.double(), k.double(), v.double(), impl="reference")
    o, _ = linear_attention(q, k, v, impl="native")
    assert o.dtype == torch.bfloat16 and rel_err(o, ref) < 1e-2


def test_state_handoff_equals_whole_sequence():
    q, k, v = (x.float() for x in qkv(2, 150, 2, 8, 16, seed=5))
    whole, (s_whole, z_whole) = linear_attention(q, k, v, impl="native", output_final_state=True)
    o1, state = linear_attention(q[:, :70], k[:, :70], v[:, :70], impl="native", output_final_state=True)
    o2, (s, z) = linear_attention(q[:, 70:], k[:, 70:], v[:, 70:], initial_state=state, impl="native",
                                  output_final_state=True)
    assert rel_err(torch.cat([o1, o2], 1), whole) < 1e-5
    assert rel_err(s, s_whole) < 1e-5 and rel_err(z, z_whole) < 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_single_sequences(side):
    """Padding holds NaN: nothing of it may reach the real positions or the state."""
    lengths, prefixes, t = [130, 64, 7], [50, 64, 0], 130
    seqs = [[x.float() for x in qkv(1, n, 2, 8, 12, seed=40 + n, enc=True)] for n in lengths]
    batch = [torch.full((3, t, *x.shape[2:]), float("nan")) for x in seqs[0]]
    mask = torch.zeros(3, t, dtype=torch.long)
    for i, (n, seq) in enumerate(zip(lengths, seqs)):
        rows = slice(t - n, t) if side == "left" else slice(0, n)
        mask[i, rows] = 1
        for x, part in zip(batch, seq):
            x[i, rows] = part[0]
    o, (s, z) = prefix_linear_attention(*batch, torch.tensor(prefixes), attention_mask=mask, impl="native",
                                        output_final_state=True)
    oc, (sc, zc) = linear_attention(*batch[:3], attention_mask=mask, impl="native", output_final_state=True)
    for i, (n, m, seq) in enumerate(zip(lengths, prefixes, seqs)):
        rows = slice(t - n, t) if side == "left" else slice(0, n)
        ref, (s_ref, z_ref) = prefix_linear_attention(*(x.double() for x in seq), torch.tensor([m]),
                                                      impl="reference", output_final_state=True)
        assert rel_err(o[i, rows], ref[0]) < 1e-5
        assert rel_err(s[i], s_ref[0]) < 1e-5 and rel_err(z[i], z_ref[0]) < 1e-5
        ref_c, (sc_ref, _) = linear_attention(*(x.double() for x in seq[:3]), impl="reference",
                                              output_final_state=True)
        assert rel_err(oc[i, rows], ref_c[0]) < 1e-5 and rel_err(sc[i], sc_ref[0]) < 1e-5


@pytest.mark.parametrize("prefix", [0, 1, 63, 64, 100, 150])
def test_prefix_matches_reference(prefix):
    q, k, v, ke, ve = qkv(2, 150, 2, 16, 24, seed=prefix, enc=True)
    lengths = torch.tensor([prefix, max(0, prefix - 30)])
    ref, (s_ref, z_ref) = prefix_linear_attention(q, k, v, ke, ve, lengths, impl="reference", output_final_state=True)
    o, (s, z) = prefix_linear_attention(*(x.float() for x in (q, k, v, ke, ve)), lengths, impl="native",
                                        output_final_state=True)
    assert rel_err(o, ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5 and rel_err(z, z_ref) < 1e-5


def test_grouped_heads_read_their_key_value_head():
    q, k, v, ke, ve = (x.float() for x in qkv(2, 100, 6, 8, 16, seed=9, hkv=2, enc=True))
    s0, z0 = torch.rand(2, 2, 1 + 8 + 64, 16), torch.rand(2, 2, 1 + 8 + 64) + 1.0
    lengths = torch.tensor([30, 0])
    o, (s, z) = prefix_linear_attention(q, k, v, ke, ve, lengths, initial_state=(s0, z0), impl="native",
                                        output_final_state=True)
    ref, (s_ref, z_ref) = prefix_linear_attention(q, k, v, ke, ve, lengths, initial_state=(s0, z0), impl="chunk",
                                                  output_final_state=True)
    assert s.shape == s0.shape and z.shape == z0.shape
    assert rel_err(o, ref) < 1e-5 and rel_err(s, s_ref) < 1e-5 and rel_err(z, z_ref) < 1e-5


def test_strided_inputs_and_a_large_output():
    """Views (heads and time not in the usual order) and an output of 16 MiB and more (streaming stores)."""
    big = torch.randn(1, 16, 4200, 80)  # [B, H, T, X]: q, k, v are slices of its last dim, transposed
    q, k, v = (big[..., a:b].transpose(1, 2) for a, b in ((0, 8), (8, 16), (16, 80)))
    o, _ = linear_attention(q, k, v, impl="native")
    ref, _ = linear_attention(q, k, v, impl="chunk")
    assert rel_err(o, ref) < 1e-5


def test_threads_give_identical_results():
    q, k, v = (x.float() for x in qkv(3, 300, 5, 16, 64, seed=2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = linear_attention(q, k, v, impl="native")
        torch.set_num_threads(2)
        two, _ = linear_attention(q, k, v, impl="native")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_auto_takes_native_on_cpu_and_chunk_for_float64():
    cpu = torch.device("cpu")
    assert resolve_impl("auto", cpu, 1000) == "native" and resolve_impl("auto", cpu, 1) == "recurrent"
    with pytest.raises(ValueError, match="float64"):
        linear_attention(*qkv(1, 8, 1, 4, 4, seed=0), impl="native")
    o64, _ = linear_attention(*qkv(1, 8, 1, 4, 4, seed=0))  # float64: the chunked form, exact
    assert o64.dtype == torch.float64


def _grads(impl: str, dtype: torch.dtype, tensors, lengths, mask, state):
    """Gradients of a random linear function of the output and the final state, with respect to every input."""
    xs = [x.detach().to(dtype).requires_grad_() for x in (*tensors, *state)]
    o, (s, z) = prefix_linear_attention(*xs[:5], lengths, attention_mask=mask, initial_state=(xs[5], xs[6]),
                                        impl=impl, output_final_state=True)
    weights = [randn(*x.shape, seed=90 + i).to(dtype) for i, x in enumerate((o, s, z))]
    loss = sum((x * w).sum() for x, w in zip((o, s, z), weights))
    loss.backward()
    return [o] + [x.grad for x in xs]


@pytest.mark.parametrize(("t", "f", "dv", "h", "hkv"), [(100, 16, 64, 2, 2), (150, 4, 5, 2, 1), (7, 8, 16, 4, 2),
                                                        (64, 16, 48, 1, 1), (200, 1, 3, 3, 3)])
def test_gradients_match_the_chunked_form(t, f, dv, h, hkv):
    """The kernel's backward pass against autograd through the float64 chunked form: q, k, v, the encoder's
    k and v, and the initial state (prefix, padding and grouped heads included)."""
    b = 2
    tensors = qkv(b, t, h, f, dv, seed=t + f, hkv=hkv, enc=True)
    d = 1 + f + f * f
    state = (randn(b, hkv, d, dv, seed=7), randn(b, hkv, d, seed=8).abs() + 1.0)
    lengths = torch.tensor([t // 2, t // 3])
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, : min(3, t - 1)] = 0
    ref = _grads("chunk", torch.float64, tensors, lengths, mask, state)
    got = _grads("native", torch.float32, tensors, lengths, mask, state)
    names = ["o", "q", "k", "v", "k_enc", "v_enc", "S0", "z0"]
    for name, x, y in zip(names, got, ref):
        assert rel_err(x, y) < 1e-5, name


def test_gradients_of_linear_attention_match_the_reference():
    q, k, v = qkv(1, 130, 2, 16, 32, seed=12)
    grads = {}
    for impl, dtype in (("reference", torch.float64), ("native", torch.float32)):
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        o, _ = linear_attention(*xs, impl=impl)
        (o * randn(*o.shape, seed=3).to(dtype)).sum().backward()
        grads[impl] = [x.grad for x in xs]
    for x, y in zip(grads["native"], grads["reference"]):
        assert rel_err(x, y) < 1e-5


def test_switched_off_or_without_a_compiler_auto_keeps_the_chunked_form(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setattr(native, "_REASON", None)
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert not native.available() and "JRT_NATIVE=0" in native.unavailable_reason()
    assert resolve_impl("auto", torch.device("cpu"), 1000) == "chunk"
    with pytest.raises(ValueError, match="unavailable"):
        linear_attention(*(x.float() for x in qkv(1, 8, 1, 4, 4, seed=0)), impl="native")
    monkeypatch.setattr(native, "_REASON", None)
    monkeypatch.delenv(native.NATIVE_ENV)
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    assert not native.available() and "could not be built" in native.unavailable_reason()


def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setattr(native, "_REASON", None)
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    assert native.available()
    built = list(tmp_path.glob("jrt_based_*.so"))
    assert len(built) == 1
    q, k, v = (x.float() for x in qkv(1, 70, 2, 4, 8, seed=4))
    ref, _ = linear_attention(q.double(), k.double(), v.double(), impl="reference")
    assert rel_err(linear_attention(q, k, v, impl="native")[0], ref) < 1e-5


def test_saved_states_are_reused_and_a_second_backward_is_a_clear_error():
    """The chunk states kept for the backward pass go back to a pool and serve the next forward pass of that size:
    the gradients of two identical steps are identical. A second backward through one graph is refused."""
    q, k, v = (x.float() for x in qkv(1, 150, 2, 8, 16, seed=6))
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o, _ = linear_attention(*leaves, impl="native")
        o.square().sum().backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    o, _ = linear_attention(q.clone().requires_grad_(), k, v, impl="native")
    loss = o.sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()
