"""The native CPU form (``impl="native"``): ``native.cpp`` compiled on first use and called through ctypes.

The kernel runs the chunked algorithm of :mod:`.chunk` one (sequence, head) row at a time with the running
state in cache, and computes every product itself with a register-blocked micro-kernel: nothing of size
``T * Dc`` (features, chunk states, their prefix sums) is written to memory, which is where the PyTorch
chunked form spends most of its time on a CPU (``docs/benchmarks.md``). It computes in float32 (bfloat16 and
float16 inputs are converted; float64 stays with the chunked form) and is differentiable: when a gradient is
needed the forward pass saves the state each chunk reads, and the backward pass is a second kernel, one reverse
sweep per row with the state's gradient (:class:`_SavedStates` pools those buffers between steps; one backward
pass per graph). ``impl="auto"`` takes it for CPU tensors when it is available, the chunked form otherwise.

Building: the system C++ compiler (``$CXX``, else ``c++``), ``-O3 -march=native``, into
``$JRT_KERNEL_CACHE`` (default ``~/.cache/jrt/kernels``), one library per source, compiler and CPU; a compile
takes a few seconds once per machine. ``JRT_NATIVE=0`` switches the form off; without a compiler
:func:`available` is False and ``auto`` keeps the chunked form (:func:`unavailable_reason` says why).
No torch headers are needed: the library has a plain C interface.

Rows are spread over a pool of single-threaded workers (``torch.get_num_threads()`` of them, as the chunked
form does); ctypes releases the GIL during each call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from jrt.ops.based.chunk import to_full, to_internal
from jrt.ops.based.chunk_inference import run_blocks
from jrt.ops.common import State, prefix_positions
from jrt.ops.feature_map import feature_dim

SOURCE = Path(__file__).with_name("native.cpp")
#: The kernel's chunk length (``C`` in ``native.cpp``).
CHUNK = 64
#: Environment variable: ``0`` switches the native form off (``auto`` then takes the chunked form).
NATIVE_ENV = "JRT_NATIVE"
#: Environment variable: where compiled libraries are kept.
CACHE_ENV = "JRT_KERNEL_CACHE"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-Wno-psabi")

_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_REASON: str | None = None


def _cpu_signature() -> str:
    """The CPU model and flags (``-march=native`` depends on them)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({x for x in lines if x.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jrt" / "kernels"


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # compile aside, then rename: safe across processes
        out = Path(tmp) / target.name
        for flags in (FLAGS, tuple(x for x in FLAGS if x != "-march=native")):
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(out, target)
                return
        raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")


def _load() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), compiler, version, " ".join(FLAGS), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"jrt_based_{key}.so"
    if not target.exists():
        _compile(compiler, target)
    lib = ctypes.CDLL(str(target))
    p = ctypes.c_void_p
    i64 = ctypes.c_int64
    f32 = ctypes.c_float
    lib.jrt_based_rows.argtypes = [i64] * 7 + [p] * 9 + [f32, p, p, p]
    lib.jrt_based_rows.restype = ctypes.c_int
    lib.jrt_based_backward_rows.argtypes = [i64] * 7 + [p] * 12 + [f32] + [p] * 9
    lib.jrt_based_backward_rows.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None when it cannot be (see :func:`unavailable_reason`)."""
    global _LIB, _REASON
    if _LIB is not None or _REASON is not None:
        return _LIB
    with _LOCK:
        if _LIB is None and _REASON is None:
            if os.environ.get(NATIVE_ENV, "").strip() == "0":
                _REASON = f"switched off by {NATIVE_ENV}=0"
            else:
                try:
                    _LIB = _load()
                except Exception as error:  # no compiler, a failed build, an unloadable library
                    _REASON = f"the native kernel could not be built: {error}"
    return _LIB


def available() -> bool:
    """True when the native kernel is built (or can be) and not switched off."""
    return library() is not None


def unavailable_reason() -> str | None:
    library()
    return _REASON


def supports(*tensors: torch.Tensor | None) -> bool:
    """True when the native form can run on these inputs: CPU tensors, not float64."""
    return all(x.device.type == "cpu" and x.dtype != torch.float64 for x in tensors if x is not None)


_MADV_HUGEPAGE = 14
_HUGE = 1 << 21


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's ``madvise`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _empty_output(*shape: int) -> torch.Tensor:
    """A new float32 tensor (an output or a gradient) whose untouched memory Linux may back with transparent huge
    pages: writing a fresh output otherwise takes one page fault per 4 KiB, a third of the op's time at 32k tokens
    (measured with perf on a 2-core VM). Only the 2 MiB-aligned interior is advised; nothing changes where THP is
    off."""
    out = torch.empty(*shape, dtype=torch.float32)
    advise = _madvise()
    if advise is not None and out.numel() * 4 >= 2 * _HUGE:
        start = -(-out.data_ptr() // _HUGE) * _HUGE
        stop = (out.data_ptr() + out.numel() * 4) // _HUGE * _HUGE
        if stop > start:
            advise(start, stop - start, _MADV_HUGEPAGE)
    return out


def _strides(x: torch.Tensor) -> ctypes.Array:
    """``[B, T, H, X]`` -> the strides of sequence, head and time, in elements."""
    return (ctypes.c_int64 * 3)(x.stride(0), x.stride(2), x.stride(1))


def _ready(x: torch.Tensor) -> torch.Tensor:
    """float32 with a contiguous last dimension (a no-op for the usual projections)."""
    x = x.to(torch.float32)
    return x if x.stride(-1) == 1 else x.contiguous()


def _parallel(call: Callable[[int, int], int], rows: int) -> None:
    """``call(g0, g1)`` over one block of the ``B*H`` rows per CPU thread (the chunked form's worker pool)."""
    step = max(1, -(-rows // max(1, min(torch.get_num_threads(), rows))))
    spans = [(g, min(g + step, rows)) for g in range(0, rows, step)]
    if any(run_blocks(call, spans, torch.device("cpu"))):
        raise MemoryError("the native kernel could not allocate its work buffers")


def _ptr(x: torch.Tensor | None) -> ctypes.c_void_p | None:
    return None if x is None else ctypes.c_void_p(x.data_ptr())


def saved_size(f: int, dv: int) -> int:
    """Floats per saved chunk state: ``Dc * Dvp + Dcp`` (``Dvp``, ``Dcp``: ``Dv``, ``Dc`` rounded up to 16)."""
    dc = feature_dim(f, compressed=True)
    return dc * (-(-dv // 16) * 16) + -(-dc // 16) * 16


def _forward(heads: int, groups: int, eps: float, q, k, v, keep, state, den=None, saved=None):
    """The kernel's forward pass: ``state [B*H, Dc, Dv+1]`` (internal space) is advanced in place; returns
    ``o [B, T, H, Dv]`` (float32), or None when ``q`` is None (an encoder sum: the state update alone). ``den
    [B*H, T]`` and ``saved [B*H, chunks, saved_size]``, when given, receive the denominators and the state each
    chunk reads (for the backward pass)."""
    lib = library()
    b, t, f, dv = k.shape[0], k.shape[1], k.shape[-1], v.shape[-1]
    o = _empty_output(b, t, heads, dv) if q is not None else None
    qs, ks, vs, os_ = (None if x is None else _strides(x) for x in (q, k, v, o))

    def call(g0: int, g1: int) -> int:
        return lib.jrt_based_rows(g0, g1, heads, groups, t, f, dv, _ptr(q), qs, _ptr(k), ks, _ptr(v), vs,
                                  _ptr(keep), _ptr(o), os_, eps, _ptr(state), _ptr(den), _ptr(saved))

    _parallel(call, b * heads)
    return o


def _backward(heads: int, groups: int, eps: float, q, k, v, keep, o, den, do, saved, dfinal, start_shape):
    """The kernel's backward pass: ``(dq, dk, dv, dstart)``, ``dstart`` of ``start_shape``; ``dk``, ``dv`` with
    ``Hkv`` heads (summed over each group's query heads), ``dq`` None when ``q`` is None (an encoder sum; ``o``,
    ``den``, ``do`` and ``saved`` None too)."""
    lib = library()
    b, t, f, dv = k.shape[0], k.shape[1], k.shape[-1], v.shape[-1]
    dq = _empty_output(b, t, heads, f) if q is not None else None
    dk, dvv = _empty_output(b, t, heads, f), _empty_output(b, t, heads, dv)
    dstart = torch.empty(start_shape)
    qs, ks, vs, os_, dos, dqs, dks, dvs = (None if x is None else _strides(x) for x in (q, k, v, o, do, dq, dk, dvv))

    def call(g0: int, g1: int) -> int:
        return lib.jrt_based_backward_rows(
            g0, g1, heads, groups, t, f, dv, _ptr(q), qs, _ptr(k), ks, _ptr(v), vs, _ptr(keep), _ptr(o),
            os_, _ptr(den), _ptr(do), dos, eps, _ptr(saved), _ptr(dfinal), _ptr(dq), dqs, _ptr(dk), dks,
            _ptr(dvv), dvs, _ptr(dstart))

    _parallel(call, b * heads)
    if groups > 1:
        dk, dvv = (x.unflatten(2, (-1, groups)).sum(3) for x in (dk, dvv))
    return dq, dk, dvv, dstart


class _SavedStates:
    """A pool of the buffers that hold the chunk states between a forward pass and its backward pass.

    A fresh buffer of hundreds of MB costs more in page faults than the kernel spends writing it (63 of 139 ms
    for a 163 MB buffer at 16k tokens and 16 heads, measured on a 2-core VM), so a backward pass hands its buffer
    back and the next forward pass of that size takes it, as the CUDA caching allocator does for GPU memory. At
    most ``LIMIT`` buffers are kept; ``JRT_NATIVE_POOL=0`` keeps none."""

    LIMIT = 64

    def __init__(self) -> None:
        self._free: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, *shape: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(shape)
            if free:
                return free.pop()
        return _empty_output(*shape)

    def give(self, buffer: torch.Tensor) -> None:
        if os.environ.get("JRT_NATIVE_POOL", "").strip() == "0":
            return
        with self._lock:
            if sum(len(x) for x in self._free.values()) < self.LIMIT:
                self._free.setdefault(tuple(buffer.shape), []).append(buffer)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


SAVED_STATES = _SavedStates()


class _Causal(torch.autograd.Function):
    """``(q, k, v, start) -> (o, final)``: the causal pass from the internal running state ``start``
    ``[B*H, Dc, Dv+1]``, differentiable through the kernel's backward pass."""

    @staticmethod
    def forward(ctx, q, k, v, start, keep, heads: int, groups: int, eps: float):
        state = start.detach().clone()
        den = saved = None
        if any(ctx.needs_input_grad[:4]):  # the denominators and every chunk's state, for the backward pass
            t, f, dv = q.shape[1], q.shape[-1], v.shape[-1]
            den = q.new_empty(state.shape[0], t)
            saved = SAVED_STATES.take(state.shape[0], -(-t // CHUNK), saved_size(f, dv))
        o = _forward(heads, groups, eps, q.detach(), k.detach(), v.detach(), keep, state, den, saved)
        ctx.save_for_backward(q, k, v, o, den, saved)
        ctx.keep, ctx.heads, ctx.groups, ctx.eps, ctx.start_shape = keep, heads, groups, eps, start.shape
        ctx.released = False
        return o, state

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dfinal):
        if ctx.released:
            raise RuntimeError("impl='native' supports one backward pass per forward pass (its saved chunk states "
                               "went back to a pool after the first); use impl='chunk' with retain_graph=True")
        q, k, v, o, den, saved = ctx.saved_tensors
        do = _ready(do) if do is not None else torch.zeros_like(o)
        dfinal = dfinal.contiguous() if dfinal is not None else None
        dq, dk, dv, dstart = _backward(ctx.heads, ctx.groups, ctx.eps, q, k, v, ctx.keep, o, den, do, saved, dfinal,
                                       ctx.start_shape)
        ctx.released = True
        SAVED_STATES.give(saved)
        return dq, dk, dv, dstart, None, None, None, None


class _Encoder(torch.autograd.Function):
    """``(k_enc, v_enc) -> E [B*H, Dc, Dv+1]``: the internal running state of the prefix sum (rows outside the
    prefix dropped by ``keep``), differentiable through the kernel's backward pass."""

    @staticmethod
    def forward(ctx, k_enc, v_enc, keep, heads: int, groups: int):
        f, dv = k_enc.shape[-1], v_enc.shape[-1]
        state = k_enc.new_zeros(k_enc.shape[0] * heads, feature_dim(f, compressed=True), dv + 1)
        _forward(heads, groups, 0.0, None, k_enc.detach(), v_enc.detach(), keep, state)
        ctx.save_for_backward(k_enc, v_enc)
        ctx.keep, ctx.heads, ctx.groups = keep, heads, groups
        return state

    @staticmethod
    @once_differentiable
    def backward(ctx, de):
        k_enc, v_enc = ctx.saved_tensors
        _, dk, dv, _ = _backward(ctx.heads, ctx.groups, 0.0, None, k_enc, v_enc, ctx.keep, None, None, None, None,
                                 de.contiguous(), de.shape)
        return dk, dv, None, None, None


def form(q, k, v, keep, state0: State | None, encoder, eps: float, output_final_state: bool):
    """The native form on the public layout (see :mod:`.layout`): ``q [B, T, H, F]``, ``k, v [B, T, Hkv, *]``
    (grouped heads read their key/value head in place), ``keep [B, T]`` or None, ``state0`` with ``Hkv`` heads,
    ``encoder (k_enc, v_enc, prefix_lengths)`` -> ``(o [B, T, H, Dv] in v's dtype, state with Hkv heads or
    None)``. Differentiable with respect to every tensor input (the kernel's own backward pass). With grouped
    heads every query head of a group runs its own copy of the group's state."""
    if library() is None:
        raise ValueError(f"impl='native' is unavailable: {unavailable_reason()}")
    if not supports(q, k, v, *(state0 or ()), *(encoder[:2] if encoder is not None else ())):
        raise ValueError("impl='native' runs float32/bfloat16/float16 CPU tensors; use impl='chunk' for float64")
    b, t, h, f = q.shape
    groups, dv = h // k.shape[2], v.shape[-1]
    if state0 is not None:
        packed = torch.cat([state0[0].float(), state0[1].float().unsqueeze(-1)], dim=-1)
        packed = packed.repeat_interleave(groups, dim=1) if groups > 1 else packed
        start = to_internal(packed.reshape(b * h, -1, dv + 1), f).contiguous()
    else:
        start = q.new_zeros(b * h, feature_dim(f, compressed=True), dv + 1, dtype=torch.float32)
    keep_u8 = keep.to(torch.uint8).contiguous() if keep is not None else None
    if encoder is not None:
        k_enc, v_enc, lengths = encoder
        in_prefix = prefix_positions(lengths, t, keep)
        hit = in_prefix.any(dim=0).nonzero()
        cut = int(hit[-1]) + 1 if hit.numel() else 0
        if cut:  # the encoder sum, over the positions up to the last prefix token of any sequence
            prefix_keep = in_prefix[:, :cut].to(torch.uint8).contiguous()
            start = start + _Encoder.apply(_ready(k_enc[:, :cut]), _ready(v_enc[:, :cut]), prefix_keep, h, groups)
    o, state = _Causal.apply(_ready(q), _ready(k), _ready(v), start, keep_u8, h, groups, eps)
    final = None
    if output_final_state:
        full = to_full(state, f).reshape(b, h, feature_dim(f), dv + 1)[:, ::groups]
        final = (full[..., :-1], full[..., -1])
    return o.to(v.dtype), final
