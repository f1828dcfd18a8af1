"""Triton kernels (``jrt.ops.triton``) against the quadratic references.

On the CPU they run under Triton's interpreter (``TRITON_INTERPRET=1``, small sizes); on a GPU the tests
marked ``gpu`` repeat the comparison at realistic sizes in float32 and bfloat16. Everything skips cleanly
when Triton is not installed.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

# Without CUDA the kernels run under the interpreter, which must be on before they are decorated (first
# import of jrt.ops.triton). On a GPU machine the CPU tests skip unless TRITON_INTERPRET=1 is set by hand.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import jrt.ops as ops  # noqa: E402
import jrt.ops.triton as jt  # noqa: E402
from helpers import interpreting  # noqa: E402
from jrt.ops import feature_dim  # noqa: E402
from jrt.ops.triton import _kernels  # noqa: E402

INTERPRETING = interpreting(_kernels, "causal_fwd_kernel")

CPU = torch.device("cpu")
cpu_kernels = pytest.mark.skipif(not INTERPRETING, reason="CPU runs need TRITON_INTERPRET=1")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error of ``a`` against the reference ``b``."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_qkv(b, t, h, f, dv, device=CPU, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, t, h, n, generator=g) for n in (f, f, dv))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def make_state(b, h, f, dv, device=CPU, seed=1):
    g = torch.Generator().manual_seed(seed)
    d = feature_dim(f)
    # a state that a real prefix would produce: z is a sum of feature vectors, so phi(q).z > 0
    kk, vv = torch.randn(b, 8, h, f, generator=g), torch.randn(b, 8, h, dv, generator=g)
    _, (s, z) = ops.linear_attention(kk.double(), kk.double(), vv.double(), output_final_state=True,
                                     impl="reference")
    assert s.shape == (b, h, d, dv)
    return s.float().to(device), z.float().to(device)


def padding_mask(b, t, left: bool, device=CPU):
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    for i in range(1, b):
        n = (3 * i + 2) % max(1, t // 2)
        if left:
            mask[i, :n] = False
        else:
            mask[i, t - n:] = False
    return mask


def check_close(out, ref, tol):
    o, state = out
    ro, rstate = ref
    assert o.shape == ro.shape and o.dtype == ro.dtype
    assert rel(o, ro) < tol, f"output rel. error {rel(o, ro):.2e}"
    assert (state is None) == (rstate is None)
    if state is not None:
        assert state[0].dtype == torch.float32 and state[1].dtype == torch.float32
        assert rel(state[0], rstate[0]) < tol, f"S rel. error {rel(state[0], rstate[0]):.2e}"
        assert rel(state[1], rstate[1]) < tol, f"z rel. error {rel(state[1], rstate[1]):.2e}"


def masked_rows(o: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return o if mask is None else o[mask]


# --------------------------------------------------------------------------------------------------
# causal linear attention (interpreter)
# --------------------------------------------------------------------------------------------------


@cpu_kernels
@pytest.mark.parametrize(
    "t,f,dv,segments",
    [
        (1, 16, 16, None), (3, 1, 1, None), (20, 32, 16, None), (37, 16, 24, None), (64, 16, 64, None),
        (17, 16, 130, None), (100, 8, 16, 3), (130, 5, 20, 2), (256, 16, 32, 4),
    ],
)
def test_linear_attention_matches_reference(t, f, dv, segments, monkeypatch):
    from jrt.ops.triton import _ops

    calls = []
    original = _ops.chunk_states
    monkeypatch.setattr(_ops, "chunk_states", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    q, k, v = make_qkv(2, t, 2, f, dv)
    out = jt.linear_attention(q, k, v, output_final_state=True, num_segments=segments)
    assert len(calls) == (1 if segments else 0)  # the segmented path ran when asked for
    ref = ops.linear_attention(q, k, v, output_final_state=True, impl="reference")
    check_close(out, ref, 1e-4)


@cpu_kernels
@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.parametrize("left", [True, False])
def test_linear_attention_initial_state_and_padding(segments, left):
    b, t, h, f, dv = 3, 90, 2, 16, 16
    q, k, v = make_qkv(b, t, h, f, dv)
    state = make_state(b, h, f, dv)
    mask = padding_mask(b, t, left)
    o, st = jt.linear_attention(q, k, v, initial_state=state, output_final_state=True, attention_mask=mask,
                                num_segments=segments)
    ro, rst = ops.linear_attention(q, k, v, initial_state=state, output_final_state=True, attention_mask=mask,
                                   impl="reference")
    assert rel(o[mask], ro[mask]) < 1e-4
    assert rel(st[0], rst[0]) < 1e-4 and rel(st[1], rst[1]) < 1e-4


@cpu_kernels
def test_linear_attention_state_handoff():
    q, k, v = make_qkv(2, 80, 2, 16, 16)
    whole, (s, z) = jt.linear_attention(q, k, v, output_final_state=True)
    first, state = jt.linear_attention(q[:, :45], k[:, :45], v[:, :45], output_final_state=True)
    second, (s2, z2) = jt.linear_attention(q[:, 45:], k[:, 45:], v[:, 45:], initial_state=state,
                                           output_final_state=True)
    assert rel(torch.cat([first, second], 1), whole) < 1e-5
    assert rel(s2, s) < 1e-5 and rel(z2, z) < 1e-5


@cpu_kernels
def test_strided_inputs_and_no_final_state():
    b, t, h, f, dv = 2, 40, 3, 16, 16
    qkv = torch.randn(b, t, h, 2 * f + dv)
    q, k, v = qkv[..., :f], qkv[..., f:2 * f], qkv[..., 2 * f:]
    o, state = jt.linear_attention(q, k, v)
    assert state is None
    ro, _ = ops.linear_attention(q, k, v, impl="reference")
    assert rel(o, ro) < 1e-4


# --------------------------------------------------------------------------------------------------
# prefix linear attention (interpreter)
# --------------------------------------------------------------------------------------------------


@cpu_kernels
@pytest.mark.parametrize("lengths", ["zero", "partial", "all"])
@pytest.mark.parametrize("segments", [1, 3])
def test_prefix_linear_attention_matches_reference(lengths, segments):
    b, t, h, f, dv = 3, 100, 2, 16, 24
    q, k, v = make_qkv(b, t, h, f, dv, seed=2)
    ke, ve = make_qkv(b, t, h, f, dv, seed=3)[1:]
    prefix = {"zero": [0, 0, 0], "partial": [0, 37, 81], "all": [t, t, t]}[lengths]
    prefix = torch.tensor(prefix)
    out = jt.prefix_linear_attention(q, k, v, ke, ve, prefix, output_final_state=True, num_segments=segments)
    ref = ops.prefix_linear_attention(q, k, v, ke, ve, prefix, output_final_state=True, impl="reference")
    check_close(out, ref, 1e-4)


@cpu_kernels
@pytest.mark.parametrize("left", [True, False])
def test_prefix_linear_attention_padding_and_initial_state(left):
    b, t, h, f, dv = 3, 70, 2, 16, 16
    q, k, v = make_qkv(b, t, h, f, dv, seed=4)
    ke, ve = make_qkv(b, t, h, f, dv, seed=5)[1:]
    mask = padding_mask(b, t, left)
    real = mask.sum(-1)
    prefix = torch.stack([real[0] // 2, real[1], torch.zeros_like(real[2])])
    state = make_state(b, h, f, dv)
    kwargs = dict(attention_mask=mask, initial_state=state, output_final_state=True)
    o, st = jt.prefix_linear_attention(q, k, v, ke, ve, prefix, num_segments=2, **kwargs)
    ro, rst = ops.prefix_linear_attention(q, k, v, ke, ve, prefix, impl="reference", **kwargs)
    assert rel(o[mask], ro[mask]) < 1e-4
    assert rel(st[0], rst[0]) < 1e-4 and rel(st[1], rst[1]) < 1e-4


# --------------------------------------------------------------------------------------------------
# decoding steps and non-finite padding (interpreter)
# --------------------------------------------------------------------------------------------------


@cpu_kernels
def test_steps_of_one_token_decode_a_sequence():
    b, t, h, f, dv = 2, 6, 2, 16, 16
    q, k, v = make_qkv(b, t, h, f, dv, seed=7)
    state = make_state(b, h, f, dv)
    outs = []
    running = state
    for i in range(t):
        o, running = jt.linear_attention(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], initial_state=running,
                                         output_final_state=True)
        outs.append(o)
    ro, (rs, rz) = ops.linear_attention(q, k, v, initial_state=state, output_final_state=True, impl="reference")
    assert rel(torch.cat(outs, 1), ro) < 1e-4 and rel(running[0], rs) < 1e-4 and rel(running[1], rz) < 1e-4


@cpu_kernels
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_at_padded_positions_do_not_leak(bad):
    b, t, h, f, dv = 3, 40, 2, 16, 16
    q, k, v = make_qkv(b, t, h, f, dv, seed=13)
    ke, ve = make_qkv(b, t, h, f, dv, seed=14)[1:]
    mask = padding_mask(b, t, left=True)
    ro, rst = ops.prefix_linear_attention(q, k, v, ke, ve, torch.tensor([5, 9, 0]), attention_mask=mask,
                                          output_final_state=True, impl="reference")
    k, v, ke, ve = (x.masked_fill(~mask[..., None, None], bad) for x in (k, v, ke, ve))
    for segments in (1, 2):
        o, st = jt.prefix_linear_attention(q, k, v, ke, ve, torch.tensor([5, 9, 0]), attention_mask=mask,
                                           output_final_state=True, num_segments=segments)
        assert rel(o[mask], ro[mask]) < 1e-4 and rel(st[0], rst[0]) < 1e-4 and rel(st[1], rst[1]) < 1e-4


# --------------------------------------------------------------------------------------------------
# dtypes, autograd, dispatch, limits (interpreter)
# --------------------------------------------------------------------------------------------------


@cpu_kernels
def test_bfloat16_and_float64_inputs():
    q, k, v = make_qkv(2, 50, 2, 16, 16)
    ref, _ = ops.linear_attention(q.double(), k.double(), v.double(), impl="reference")
    o16, st = jt.linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), output_final_state=True)
    assert o16.dtype == torch.bfloat16 and st[0].dtype == torch.float32
    assert rel(o16, ref) < 2e-2
    o64, st64 = jt.linear_attention(q.double(), k.double(), v.double(), output_final_state=True)
    assert o64.dtype == torch.float64 and st64[0].dtype == torch.float32
    assert rel(o64, ref) < 1e-4


@cpu_kernels
@pytest.mark.parametrize("prefix", [False, True])
def test_backward_matches_reference(prefix):
    b, t, h, f, dv = 2, 40, 2, 8, 16
    tensors = [*make_qkv(b, t, h, f, dv, seed=8), *make_qkv(b, t, h, f, dv, seed=9)[1:]]
    state = make_state(b, h, f, dv)
    grads = []
    for impl in ("triton", "reference"):
        leaves = [x.clone().requires_grad_(True) for x in tensors]
        s0 = (state[0].clone().requires_grad_(True), state[1].clone().requires_grad_(True))
        q, k, v, ke, ve = leaves
        if prefix:
            o, (s, z) = ops.prefix_linear_attention(q, k, v, ke, ve, torch.tensor([11, 40]), initial_state=s0,
                                                    output_final_state=True, impl=impl)
            used = leaves + list(s0)
        else:
            o, (s, z) = ops.linear_attention(q, k, v, initial_state=s0, output_final_state=True, impl=impl)
            used = leaves[:3] + list(s0)
        loss = (o * torch.linspace(-1, 1, dv)).sum() + 1e-3 * (s.sum() + z.sum())
        grads.append(torch.autograd.grad(loss, used))
    for got, want in zip(*grads):
        assert rel(got, want) < 1e-4


@cpu_kernels
def test_dispatch_through_jrt_ops(monkeypatch):
    q, k, v = make_qkv(2, 33, 2, 16, 16)
    ref, _ = ops.linear_attention(q, k, v, impl="reference")
    o, _ = ops.linear_attention(q, k, v, impl="triton")
    assert rel(o, ref) < 1e-4
    # CPU behaviour of auto is unchanged (Triton is for CUDA tensors), and JRT_OPS_IMPL forces a PyTorch form
    monkeypatch.delenv(ops.IMPL_ENV, raising=False)
    assert ops.resolve_impl("auto", CPU, 33) in ("native", "chunk")
    assert ops.resolve_impl("auto", CPU, 1) == "recurrent"
    monkeypatch.setenv(ops.IMPL_ENV, "chunk")
    assert ops.resolve_impl("auto", torch.device("cuda"), 33) == "chunk"
    monkeypatch.setenv(ops.IMPL_ENV, "triton")
    o2, _ = ops.linear_attention(q, k, v)
    assert rel(o2, ref) < 1e-4


@cpu_kernels
def test_limits_are_value_errors():
    q, k, v = make_qkv(1, 4, 1, 40, 16)
    with pytest.raises(ValueError, match="F <= 32"):
        jt.linear_attention(q, k, v)
    q, k, v = make_qkv(1, 4, 1, 16, 16)
    with pytest.raises(ValueError, match="num_segments"):
        jt.linear_attention(q, k, v, num_segments=0)


@cpu_kernels
def test_matches_flash_linear_attention_naive():
    """Cross-check with flash-linear-attention's own quadratic Based reference, when ``fla`` is installed."""
    naive = pytest.importorskip("fla.ops.based.naive").naive_parallel_based
    q, k, v = make_qkv(2, 100, 2, 16, 32, seed=10)
    o, _ = jt.linear_attention(q, k, v)
    ref = naive(*(x.transpose(1, 2).double() for x in (q, k, v))).transpose(1, 2)  # fla's eps is 1e-6 too
    assert rel(o, ref) < 1e-4


def test_import_error_without_triton(monkeypatch):
    """Without Triton, ``import jrt.ops.triton`` raises ImportError and the dispatcher reports it cleanly."""
    import sys

    from jrt.ops.based.api import triton_available

    monkeypatch.setitem(sys.modules, "triton", None)
    for name in [m for m in sys.modules if m == "jrt.ops.triton" or m.startswith("jrt.ops.triton.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(sys.modules["jrt.ops"], "triton", raising=False)
    with pytest.raises(ImportError):
        importlib.import_module("jrt.ops.triton")
    assert not triton_available()
    q, k, v = make_qkv(1, 4, 1, 4, 4)
    with pytest.raises(ValueError, match="needs the Triton kernels"):
        ops.linear_attention(q, k, v, impl="triton")


def test_cuda_launch_setup():
    from jrt.ops.triton import _common

    # every CUDA configuration has a chunk length dividing the segment multiple, and autotuners build
    for name, configs in jt.CUDA_CONFIGS.items():
        assert all(_common.segment_length(1000, 3) % bt == 0 for bt, _, _ in configs)
        assert len(_common.tuned(name).configs) == len(configs)
    assert _common.segment_count(4, 64, 10_000, CPU, None) == 1
    assert _common.segment_count(4, 64, 10, CPU, 32) == 10


@cpu_kernels
@pytest.mark.parametrize("method", ["jrt_prompt", "jrt_rnn", "based"])
def test_benchmark_cases_run(method):
    from jrt.bench.prefill_methods import Shape, build

    case = build(method, "kernels", Shape(1, 2, 32, 16, 16, CPU, torch.float32))
    o, state = case.run()
    assert o.shape == (1, 64 if method == "jrt_prompt" else 32, 2, 16) and state is None
    assert case.flops > 0 and case.tokens == 32 and case.nbytes > 0


def test_benchmark_table_and_cuda_check():
    from jrt.bench import prefill_cuda

    rows = [
        {"method": "sdpa", "T": 2048, "ms": 2.0, "tokens_per_s": 1e6, "tflops": 100.0, "speedup_vs_sdpa": 1.0,
         "error": None},
        {"method": "jrt_rnn", "T": 2048, "ms": 0.5, "tokens_per_s": 4e6, "tflops": 10.0, "gbps": 1000.0,
         "speedup_vs_sdpa": 4.0, "error": None},
        {"method": "based", "T": 2048, "ms": None, "tokens_per_s": None, "tflops": None, "speedup_vs_sdpa": None,
         "error": "out of memory"},
    ]
    result = {"device": "test", "torch": "x", "ceilings": {"matmul_bf16_tflops": 800.0, "copy_gbps": 4000.0},
              "config": {}, "skipped_methods": ["fla_parallel_based"], "rows": rows}
    table = prefill_cuda.markdown_table(result)
    assert "| 2048 | jrt_rnn | 0.500 |" in table and "4.00 |" in table and "out of memory" in table
    assert "10.0 (1.2%)" in table and "1000 (25.0%)" in table
    assert "fla_parallel_based" in table
    assert prefill_cuda.sdpa_flops(1, 1, 4, 2) == 2 * 2 * 16 * 2 / 2
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            prefill_cuda.run_cuda_prefill(lengths=(64,))


# --------------------------------------------------------------------------------------------------
# offline compilation for a Hopper GPU (no GPU needed: Triton ships ptxas); catches GPU-only errors
# --------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import json, os, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from jrt.ops.triton import _kernels, _ops

IO = ("q_ptr", "k_ptr", "v_ptr", "o_ptr")
TYPES = {"keep_ptr": "*i8", "end_ptr": "*i32", "scale": "fp32", "eps": "fp32"}

def compile_sm90(name, config, dtype, constexprs):
    kernel = getattr(_kernels, name)
    bt, bv, warps = config
    consts = dict(constexprs, BV=bv)
    if "BT" in kernel.arg_names:
        consts["BT"] = bt
    signature = {}
    for arg in kernel.arg_names:
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg in IO:
            signature[arg] = "*" + dtype
        else:
            signature[arg] = TYPES.get(arg, "*fp32" if arg.endswith("_ptr") else "i32")
    compiled = triton.compile(ASTSource(kernel, signature, consts), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps})
    return len(compiled.asm["cubin"])

cases = json.loads(sys.argv[1])
print(json.dumps([compile_sm90(*case) for case in cases]))
"""

_SM90_CASES = [
    ("causal_fwd_kernel", dict(BK=16, HAS_KEEP=True, HAS_INIT=True, STORE_FINAL=True)),
    ("chunk_state_kernel", dict(BK=16, HAS_KEEP=True, HAS_END=True)),
]


def _compile_for_hopper(cases: list) -> list[int]:
    """Compile ``(kernel name, (BT, BV, warps), dtype, constexprs)`` cases for sm_90 in a fresh process
    (the kernels must be decorated without the interpreter); returns the cubin sizes."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(cases)], capture_output=True,
                          text=True, env=env, timeout=900)
    if proc.returncode != 0 and "nvidia" in proc.stderr and "No module" in proc.stderr:
        pytest.skip("Triton's NVIDIA backend is not available")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernels_compile_for_hopper():
    """Every kernel's default configuration compiles for sm_90 (Triton ships ptxas: no GPU needed). This
    catches errors that the interpreter does not see (e.g. non-constexpr globals, layout problems)."""

    cases = []
    for name, constexprs in _SM90_CASES:
        config = jt.CUDA_CONFIGS[name][0]
        cases += [[name, config, "bf16", {**constexprs, "LOWP": True, "LOWP_BF16": True}],
                  [name, config, "fp32", {**constexprs, "LOWP": False, "LOWP_BF16": True}]]
    assert all(size > 0 for size in _compile_for_hopper(cases))


@pytest.mark.slow
def test_every_autotune_config_compiles_for_hopper():

    cases = []
    for name, constexprs in _SM90_CASES:
        for config in jt.CUDA_CONFIGS[name]:
            for flags in (False, True):
                cx = {k: (flags if k.startswith(("HAS_", "STORE_")) else v) for k, v in constexprs.items()}
                cases.append([name, config, "bf16", {**cx, "LOWP": True, "LOWP_BF16": True}])
    assert all(size > 0 for size in _compile_for_hopper(cases))


# --------------------------------------------------------------------------------------------------
# GPU: realistic sizes, float32 and bfloat16
# --------------------------------------------------------------------------------------------------

GPU_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _gpu_reference_linear(q, k, v, **kwargs):
    # float64 chunked form (linear memory) stands in for the quadratic reference at these sizes
    return ops.linear_attention(q.double(), k.double(), v.double(), impl="chunk", **kwargs)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1000, 4096])
def test_gpu_linear_attention(dtype, t):
    dev = torch.device("cuda")
    b, h, f, dv = 4, 8, 16, 64
    q, k, v = make_qkv(b, t, h, f, dv, device=dev, dtype=dtype)
    q, k = q * 0.5, k * 0.5  # keep s = q.k/sqrt(F) in a realistic range for bfloat16
    state = make_state(b, h, f, dv, device=dev)
    mask = padding_mask(b, t, left=True, device=dev)
    o, (s, z) = jt.linear_attention(q, k, v, initial_state=state, output_final_state=True, attention_mask=mask)
    ro, (rs, rz) = _gpu_reference_linear(q, k, v, initial_state=state, output_final_state=True,
                                         attention_mask=mask)
    tol = GPU_TOL[dtype]
    assert rel(o[mask], ro[mask]) < tol and rel(s, rs) < tol and rel(z, rz) < tol
    for segments in (1, 7):
        o2, _ = jt.linear_attention(q, k, v, initial_state=state, attention_mask=mask, num_segments=segments)
        assert rel(o2[mask], ro[mask]) < tol


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_prefix_linear_attention(dtype):
    dev = torch.device("cuda")
    b, t, h, f, dv = 4, 2048, 8, 16, 64
    q, k, v = (x * s for x, s in zip(make_qkv(b, t, h, f, dv, device=dev, dtype=dtype, seed=1), (0.5, 0.5, 1)))
    ke, ve = (x * s for x, s in zip(make_qkv(b, t, h, f, dv, device=dev, dtype=dtype, seed=2)[1:], (0.5, 1)))
    prefix = torch.tensor([0, 1, 1000, t], device=dev)
    o, (s, z) = jt.prefix_linear_attention(q, k, v, ke, ve, prefix, output_final_state=True)
    ro, (rs, rz) = ops.prefix_linear_attention(q.double(), k.double(), v.double(), ke.double(), ve.double(),
                                               prefix, output_final_state=True, impl="chunk")
    tol = GPU_TOL[dtype]
    assert rel(o, ro) < tol and rel(s, rs) < tol and rel(z, rz) < tol


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_step(dtype):
    dev = torch.device("cuda")
    b, h, f, dv = 16, 16, 16, 64
    q, k, v = make_qkv(b, 1, h, f, dv, device=dev, dtype=dtype)
    state = make_state(b, h, f, dv, device=dev)
    o, (s, z) = jt.linear_attention(q, k, v, initial_state=state, output_final_state=True)
    ro, (rs, rz) = ops.linear_attention(q.double(), k.double(), v.double(), initial_state=state,
                                        output_final_state=True, impl="reference")
    tol = GPU_TOL[dtype]
    assert rel(o, ro) < tol and rel(s, rs) < 1e-5 and rel(z, rz) < 1e-5


@gpu
@needs_cuda
def test_gpu_backward_matches_chunk():
    dev = torch.device("cuda")
    b, t, h, f, dv = 2, 300, 4, 16, 64
    tensors = [*make_qkv(b, t, h, f, dv, device=dev, seed=11), *make_qkv(b, t, h, f, dv, device=dev, seed=12)[1:]]
    grads = []
    for impl in ("triton", "chunk"):
        leaves = [x.clone().requires_grad_(True) for x in tensors]
        q, k, v, ke, ve = leaves
        o, _ = ops.prefix_linear_attention(q, k, v, ke, ve, torch.tensor([100, 0], device=dev), impl=impl)
        grads.append(torch.autograd.grad((o * o).sum(), leaves))
    for got, want in zip(*grads):
        assert rel(got, want) < 1e-4


@gpu
@needs_cuda
def test_gpu_auto_dispatch_picks_triton(monkeypatch):
    monkeypatch.delenv(ops.IMPL_ENV, raising=False)
    assert ops.resolve_impl("auto", torch.device("cuda"), 128) == "triton"
