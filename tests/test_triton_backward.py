"""Backward kernels of the Triton operators (``jrt.ops.triton._backward``) against the reference gradients.

Every gradient (``q, k, v``, ``k_enc, v_enc``, the initial state ``S_0, z_0``) of the float32 kernels is compared
with ``torch.autograd`` through ``impl="reference"`` in float64, by relative error. On the CPU the kernels run
under Triton's interpreter (``TRITON_INTERPRET=1``) at small sizes; the tests marked ``gpu`` repeat the
comparison at realistic sizes on CUDA, and one test compiles the kernels for sm_90 without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import jrt.ops as ops  # noqa: E402
from helpers import interpreting  # noqa: E402
from jrt.ops.triton import _backward, _backward_kernels  # noqa: E402

INTERPRETING = interpreting(_backward_kernels, "bwd_dq_kernel", _backward)

cpu_kernels = pytest.mark.skipif(not INTERPRETING, reason="CPU runs need TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
NAMES = ("q", "k", "v", "k_enc", "v_enc", "S0", "z0")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative (Frobenius) error of ``a`` against the reference ``b``."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(b, t, h, f, dv, seed=0, scale=1.0):
    """``[q, k, v, k_enc, v_enc, S0, z0]`` float32 on the CPU; the state is one a real prefix produces."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(b, t, h, n, generator=g) for n in (f, f, dv, f, dv)]
    x = [y * scale if i in (0, 1, 3) else y for i, y in enumerate(x)]  # queries and keys
    kk, vv = torch.randn(b, 6, h, f, generator=g).double(), torch.randn(b, 6, h, dv, generator=g).double()
    _, (s0, z0) = ops.linear_attention(kk, kk, vv, output_final_state=True, impl="reference")
    return x + [s0.float(), z0.float()]


def run_grads(impl, tensors, *, prefix_lengths=None, mask=None, with_state=True, final_state=True,
              dtype=None, wanted=NAMES, device="cpu", symmetric=False):
    """Gradients of a fixed random loss over ``o`` (real positions only) and the final state with ``impl``;
    ``prefix_lengths`` None runs ``linear_attention``. Returns ``({name: grad}, o)``.

    ``symmetric``: the loss weights of the final state's quadratic block symmetric in ``(a, b)``. Needed to
    compare with ``impl="chunk"``, which symmetrises that block of the initial state (as every real state
    ``sum phi(k) v^T`` has it), so that its ``d S_T / d S_0`` is the symmetriser rather than the identity."""
    leaves = {}
    for name, x in zip(NAMES, tensors):
        x = x.to(device=device, dtype=dtype or x.dtype)
        leaves[name] = x.detach().clone().requires_grad_(name in wanted)
    mask = None if mask is None else mask.to(device)
    state = (leaves["S0"], leaves["z0"]) if with_state else None
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    if prefix_lengths is None:
        o, st = ops.linear_attention(q, k, v, initial_state=state, output_final_state=final_state,
                                     attention_mask=mask, impl=impl)
        names = [n for n in wanted if n not in ("k_enc", "v_enc")]
    else:
        o, st = ops.prefix_linear_attention(q, k, v, leaves["k_enc"], leaves["v_enc"], prefix_lengths,
                                            attention_mask=mask, initial_state=state,
                                            output_final_state=final_state, impl=impl)
        names = list(wanted)
    if not with_state:
        names = [n for n in names if n not in ("S0", "z0")]
    g = torch.Generator().manual_seed(123)
    weight = torch.randn(o.shape, generator=g).to(device=device, dtype=o.dtype)
    real = torch.ones(o.shape[:2], dtype=torch.bool, device=device) if mask is None else mask
    loss = (o * weight * real[..., None, None]).sum()
    if final_state:
        ws = torch.randn(st[0].shape, generator=g).to(device=device, dtype=st[0].dtype)
        wz = torch.randn(st[1].shape, generator=g).to(device=device, dtype=st[1].dtype)
        if symmetric:
            f = q.shape[-1]
            ws, wz = (_symmetrise(x.transpose(-1, -2), f).transpose(-1, -2) for x in (ws, wz[..., None]))
            wz = wz[..., 0]
        loss = loss + 0.1 * ((st[0] * ws).sum() + (st[1] * wz).sum())
    found = torch.autograd.grad(loss, [leaves[n] for n in names])
    return dict(zip(names, found)), o


def _symmetrise(x: torch.Tensor, f: int) -> torch.Tensor:
    """``[..., 1+F+F^2]``: the quadratic block averaged with its transpose."""
    quad = x[..., 1 + f:].unflatten(-1, (f, f))
    return torch.cat([x[..., : 1 + f], ((quad + quad.transpose(-1, -2)) / 2).flatten(-2)], dim=-1)


def compare(got: dict, want: dict, tol: float) -> dict:
    assert got.keys() == want.keys()
    errors = {n: rel(got[n], want[n]) for n in got}
    for n, err in errors.items():
        assert got[n].dtype == want[n].dtype or want[n].dtype == torch.float64, n
        assert err < tol, f"d{n}: relative error {err:.2e} (all: {errors})"
    return errors


def reference(tensors, **kwargs):
    return run_grads("reference", tensors, dtype=torch.float64, **kwargs)[0]


def side_masks(b, t, left):
    mask = torch.ones(b, t, dtype=torch.bool)
    for i in range(1, b):
        n = 3 + 5 * i
        if left:
            mask[i, :n] = False
        else:
            mask[i, t - n:] = False
    return mask


# --------------------------------------------------------------------------------------------------
# interpreter: linear_attention
# --------------------------------------------------------------------------------------------------


@cpu_kernels
@pytest.mark.parametrize(
    "b,t,h,f,dv",
    [(2, 37, 2, 4, 20), (1, 45, 2, 16, 40), (2, 16, 1, 16, 16), (3, 1, 1, 4, 3), (1, 50, 1, 5, 33)],
)
def test_linear_attention_gradients(b, t, h, f, dv):
    """All gradients incl. the initial state; T not a multiple of the chunk (16); Dv over two value blocks."""
    tensors = inputs(b, t, h, f, dv, seed=t)
    got, _ = run_grads("triton", tensors)
    compare(got, reference(tensors), 1e-5)


@cpu_kernels
@pytest.mark.parametrize("left", [True, False])
def test_linear_attention_padding(left):
    """Left/right padding: the gradients match and padded positions get none (the loss reads real rows)."""
    b, t, h, f, dv = 3, 34, 1, 16, 24
    tensors = inputs(b, t, h, f, dv, seed=5)
    mask = side_masks(b, t, left)
    got, _ = run_grads("triton", tensors, mask=mask)
    compare(got, reference(tensors, mask=mask), 1e-5)
    for name in ("q", "k", "v"):
        assert got[name][~mask].abs().max() == 0, name


@cpu_kernels
def test_linear_attention_without_state_and_partial_needs():
    """No initial state, no final state; only some inputs require grad; only the final state in the loss."""
    tensors = inputs(2, 20, 1, 4, 12, seed=7)
    for kwargs in (dict(with_state=False, final_state=False), dict(wanted=("v", "z0")),
                   dict(wanted=("q", "S0"), final_state=False)):
        got, _ = run_grads("triton", tensors, **kwargs)
        compare(got, reference(tensors, **kwargs), 1e-5)
    # a loss on the final state alone: dq is zero, dk/dv/dS0 are not
    leaves = [x.clone().requires_grad_(True) for x in tensors[:3]]
    s0 = (tensors[5].clone().requires_grad_(True), tensors[6])
    _, (s, z) = ops.linear_attention(*leaves, initial_state=s0, output_final_state=True, impl="triton")
    got = torch.autograd.grad(s.sum() + z.sum(), [*leaves, s0[0]])
    ref_leaves = [x.double().requires_grad_(True) for x in tensors[:3]]
    ref_s0 = (tensors[5].double().requires_grad_(True), tensors[6].double())
    _, (rs, rz) = ops.linear_attention(*ref_leaves, initial_state=ref_s0, output_final_state=True,
                                       impl="reference")
    want = torch.autograd.grad(rs.sum() + rz.sum(), [*ref_leaves[1:], ref_s0[0]])
    assert got[0].abs().max() == 0
    for a, r in zip(got[1:], want):
        assert rel(a, r) < 1e-5
    # o.sum(): autograd hands the backward an expanded (stride 0) output gradient
    o, _ = ops.linear_attention(*leaves, initial_state=s0, impl="triton")
    got = torch.autograd.grad(o.sum(), leaves)
    ro, _ = ops.linear_attention(*ref_leaves, initial_state=ref_s0, impl="reference")
    want = torch.autograd.grad(ro.sum(), ref_leaves)
    for a, r in zip(got, want):
        assert rel(a, r) < 1e-5


@cpu_kernels
def test_low_and_high_precision_inputs():
    """bfloat16 inputs (looser tolerance) and float64 inputs (computed in float32), gradients in their dtype."""
    tensors = inputs(2, 33, 1, 16, 20, seed=9, scale=0.5)
    want = reference(tensors)
    got16, o16 = run_grads("triton", tensors, dtype=torch.bfloat16)
    assert o16.dtype == torch.bfloat16 and got16["q"].dtype == torch.bfloat16
    compare({n: g.double() for n, g in got16.items()}, want, 1e-2)
    got64, _ = run_grads("triton", tensors, dtype=torch.float64)
    assert got64["q"].dtype == torch.float64 and got64["S0"].dtype == torch.float64
    compare(got64, want, 1e-5)


# --------------------------------------------------------------------------------------------------
# interpreter: prefix_linear_attention
# --------------------------------------------------------------------------------------------------


@cpu_kernels
@pytest.mark.parametrize("f,dv", [(4, 20), (16, 36)])
def test_prefix_linear_attention_gradients(f, dv):
    """Prefix lengths 0, mid and full in one batch; encoder gradients vanish past each prefix."""
    b, t, h = 3, 35, 1
    tensors = inputs(b, t, h, f, dv, seed=f)
    lengths = torch.tensor([0, 17, t])
    got, _ = run_grads("triton", tensors, prefix_lengths=lengths)
    compare(got, reference(tensors, prefix_lengths=lengths), 1e-5)
    for i, m in enumerate(lengths.tolist()):
        assert got["k_enc"][i, m:].abs().sum() == 0 and got["v_enc"][i, m:].abs().sum() == 0
        if m:
            assert got["v_enc"][i, :m].abs().min() > 0


@cpu_kernels
@pytest.mark.parametrize("left", [True, False])
def test_prefix_linear_attention_padding(left):
    b, t, h, f, dv = 3, 36, 1, 16, 18
    tensors = inputs(b, t, h, f, dv, seed=11)
    mask = side_masks(b, t, left)
    lengths = torch.tensor([t, 9, 0])
    got, _ = run_grads("triton", tensors, prefix_lengths=lengths, mask=mask)
    compare(got, reference(tensors, prefix_lengths=lengths, mask=mask), 1e-5)
    for name in ("q", "k", "v", "k_enc", "v_enc"):
        assert got[name][~mask].abs().max() == 0, name


@cpu_kernels
def test_prefix_without_state_and_encoder_only():
    tensors = inputs(2, 20, 1, 4, 10, seed=13)
    lengths = torch.tensor([20, 6])
    for kwargs in (dict(with_state=False, final_state=False), dict(wanted=("k_enc",), with_state=False)):
        got, _ = run_grads("triton", tensors, prefix_lengths=lengths, **kwargs)
        compare(got, reference(tensors, prefix_lengths=lengths, **kwargs), 1e-5)


# --------------------------------------------------------------------------------------------------
# which path runs
# --------------------------------------------------------------------------------------------------


@cpu_kernels
def test_kernel_path_runs_and_recompute_fallback(monkeypatch):
    """By default the kernels run; ``JRT_TRITON_BACKWARD=recompute`` takes the chunked recompute path instead,
    with the same gradients; a bad value is a ValueError."""
    calls = []
    original = _backward.backward
    monkeypatch.setattr(_backward, "backward", lambda *a: calls.append(1) or original(*a))
    tensors = inputs(2, 21, 1, 4, 8, seed=17)
    lengths = torch.tensor([5, 21])
    # no loss on the final state here: the chunked form symmetrises the quadratic block of S_0 (a state
    # phi(k) v^T always has it symmetric), so its gradient of S_T with respect to S_0 is the symmetrised one
    monkeypatch.delenv(_backward.BACKWARD_ENV, raising=False)
    kernel, _ = run_grads("triton", tensors, prefix_lengths=lengths, final_state=False)
    assert calls == [1]
    monkeypatch.setenv(_backward.BACKWARD_ENV, "recompute")
    fallback, _ = run_grads("triton", tensors, prefix_lengths=lengths, final_state=False)
    assert calls == [1]
    compare(kernel, fallback, 1e-5)
    monkeypatch.setenv(_backward.BACKWARD_ENV, "fast")
    with pytest.raises(ValueError, match=_backward.BACKWARD_ENV):
        run_grads("triton", tensors, prefix_lengths=lengths)
    monkeypatch.setenv(_backward.BACKWARD_ENV, "kernel")
    assert _backward.uses_kernels(32) and not _backward.uses_kernels(33)


# --------------------------------------------------------------------------------------------------
# offline compilation for a Hopper GPU (Triton ships ptxas: no GPU needed)
# --------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import json, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from jrt.ops.triton import _backward, _backward_kernels

IO = ("q_ptr", "k_ptr", "v_ptr", "do_ptr")
TYPES = {"keep_ptr": "*i8", "scale": "fp32", "eps": "fp32"}

def compile_sm90(name, bk, dtype, constexprs):
    kernel = getattr(_backward_kernels, name)
    bt, bv, warps = _backward._CUDA_CONFIG[bk]
    consts = dict(constexprs, BT=bt, BV=bv, BK=bk)
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

print(json.dumps([compile_sm90(*case) for case in json.loads(sys.argv[1])]))
"""


def _compile_for_hopper(cases: list) -> list[int]:
    """Compile ``[kernel name, BK, dtype, constexprs]`` cases for sm_90 in a fresh process (the kernels must
    be decorated without the interpreter) with their CUDA launch configuration; returns the cubin sizes."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(cases)], capture_output=True,
                          text=True, env=env, timeout=900)
    if proc.returncode != 0 and "nvidia" in proc.stderr and "No module" in proc.stderr:
        pytest.skip("Triton's NVIDIA backend is not available")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_BF16 = {"LOWP": True, "LOWP_BF16": True}
_FP32 = {"LOWP": False, "LOWP_BF16": False}
_FLAGS = {
    "bwd_dq_kernel": ("HAS_KEEP", "HAS_INIT"),
    "bwd_dkv_kernel": ("HAS_KEEP", "HAS_DFINAL", "STORE_DINIT"),
    "bwd_state_kv_kernel": (),
}


def test_backward_kernels_compile_for_hopper():
    """Each backward kernel compiles for sm_90 with bfloat16 operands and every option on (F = 16), which the
    interpreter cannot check."""
    cases = [[name, 16, "bf16", {**{flag: True for flag in flags}, **_BF16}] for name, flags in _FLAGS.items()]
    assert all(size > 0 for size in _compile_for_hopper(cases))


@pytest.mark.slow
def test_backward_kernels_compile_for_hopper_all_configs():
    """float32 operands, options off, and the F = 32 configuration."""
    cases = []
    for name, flags in _FLAGS.items():
        cases.append([name, 16, "fp32", {**{flag: False for flag in flags}, **_FP32}])
        cases.append([name, 32, "bf16", {**{flag: True for flag in flags}, **_BF16}])
    assert all(size > 0 for size in _compile_for_hopper(cases))


# --------------------------------------------------------------------------------------------------
# GPU: realistic sizes
# --------------------------------------------------------------------------------------------------


def _chunk_reference(tensors, **kwargs):
    # float64 chunked form (linear memory) stands in for the quadratic reference at these sizes
    return run_grads("chunk", tensors, dtype=torch.float64, device="cuda", symmetric=True, **kwargs)[0]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("f", [16, 32])
def test_gpu_linear_attention_gradients(dtype, tol, f):
    b, t, h, dv = 4, 2048, 8, 64
    tensors = inputs(b, t, h, f, dv, seed=21, scale=0.5)
    mask = side_masks(b, t, left=True)
    got, _ = run_grads("triton", tensors, mask=mask, dtype=dtype, device="cuda", symmetric=True)
    compare({n: g.double() for n, g in got.items()}, _chunk_reference(tensors, mask=mask), tol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_gpu_prefix_linear_attention_gradients(dtype, tol):
    b, t, h, f, dv = 4, 2048, 8, 16, 64
    tensors = inputs(b, t, h, f, dv, seed=23, scale=0.5)
    lengths = torch.tensor([0, 700, 1024, t], device="cuda")
    got, _ = run_grads("triton", tensors, prefix_lengths=lengths, dtype=dtype, device="cuda", symmetric=True)
    compare({n: g.double() for n, g in got.items()}, _chunk_reference(tensors, prefix_lengths=lengths), tol)
