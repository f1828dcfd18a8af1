"""The native CPU form (``impl="native"``): ``native.cpp`` compiled on first use and called through ctypes.

The kernel runs the chunked algorithm of :mod:`.chunk` one (sequence, head) row at a time with the running
state in cache, and computes every product itself with a register-blocked micro-kernel: nothing of size
``T * Dc`` (features, chunk states, their prefix sums) is written to memory, which is where the PyTorch
chunked form spends most of its time on a CPU (``docs/benchmarks.md``). It is an inference form: float32
(bfloat16/float16 inputs are computed in float32), no autograd; ``impl="auto"`` takes it on CPU tensors when
it is available and nothing needs a gradient, and the chunked form otherwise.

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
from pathlib import Path

import torch

from jrt.ops.based.chunk import to_full, to_internal
from jrt.ops.based.chunk_inference import single_threaded_workers
from jrt.ops.common import State, prefix_positions
from jrt.ops.feature_map import feature_dim

SOURCE = Path(__file__).with_name("native.cpp")
#: Environment variable: ``0`` switches the native form off (``auto`` then takes the chunked form).
NATIVE_ENV = "JRT_NATIVE"
#: Environment variable: where compiled libraries are kept.
CACHE_ENV = "JRT_KERNEL_CACHE"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")

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
    lib.jrt_based_rows.argtypes = [i64, i64, i64, i64, i64, i64, i64, p, p, p, p, p, p, p, p, p, ctypes.c_float, p]
    lib.jrt_based_rows.restype = ctypes.c_int
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
    """True when the native form can run on these inputs: CPU, not float64, nothing needs a gradient."""
    real = [x for x in tensors if x is not None]
    if any(x.device.type != "cpu" or x.dtype == torch.float64 for x in real):
        return False
    return not (torch.is_grad_enabled() and any(x.requires_grad for x in real))


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
    """A new float32 tensor whose (untouched) memory Linux may back with transparent huge pages: writing a fresh
    output otherwise takes one page fault per 4 KiB, a third of the op's time at 32k tokens (measured with perf
    on a 2-core VM). Only the 2 MiB-aligned interior is advised; nothing changes where THP is off."""
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


def _run(lib: ctypes.CDLL, rows: int, heads: int, groups: int, q, k, v, keep, o, eps: float, state) -> None:
    """Rows of ``B*H`` in blocks over the worker pool; ``q is None``: state update only."""
    t, f, dv = k.shape[1], k.shape[-1], v.shape[-1]
    ks, vs = _strides(k), _strides(v)
    qs = _strides(q) if q is not None else None
    os_ = _strides(o) if o is not None else None
    ptr = ctypes.c_void_p

    def call(span: tuple[int, int]) -> None:
        code = lib.jrt_based_rows(
            span[0], span[1], heads, groups, t, f, dv,
            ptr(q.data_ptr()) if q is not None else None, qs, ptr(k.data_ptr()), ks, ptr(v.data_ptr()), vs,
            ptr(keep.data_ptr()) if keep is not None else None,
            ptr(o.data_ptr()) if o is not None else None, os_, eps, ptr(state.data_ptr()),
        )
        if code:
            raise MemoryError("the native kernel could not allocate its work buffers")

    threads = max(1, min(torch.get_num_threads(), rows))
    step = -(-rows // threads)
    spans = [(g, min(g + step, rows)) for g in range(0, rows, step)]
    if len(spans) > 1:
        list(single_threaded_workers(threads).map(call, spans))
    else:
        call(spans[0])


def form(q, k, v, keep, state0: State | None, encoder, eps: float, output_final_state: bool):
    """The native form on the public layout (see :mod:`.layout`): ``q [B, T, H, F]``, ``k, v [B, T, Hkv, *]``
    (grouped heads read their key/value head in place), ``keep [B, T]`` or None, ``state0`` with ``Hkv`` heads,
    ``encoder (k_enc, v_enc, prefix_lengths)`` -> ``(o [B, T, H, Dv] in v's dtype, state with Hkv heads or
    None)``. With grouped heads every query head of a group runs its own copy of the group's state."""
    lib = library()
    if lib is None:
        raise ValueError(f"impl='native' is unavailable: {unavailable_reason()}")
    if not supports(q, k, v, *(state0 or ()), *(encoder[:2] if encoder is not None else ())):
        raise ValueError("impl='native' runs float32/bfloat16/float16 CPU tensors without autograd; use impl='chunk'")
    b, t, h, f = q.shape
    groups, dv = h // k.shape[2], v.shape[-1]
    dc = feature_dim(f, compressed=True)
    with torch.no_grad():
        if state0 is not None:
            packed = torch.cat([state0[0].float(), state0[1].float().unsqueeze(-1)], dim=-1)
            packed = packed.repeat_interleave(groups, dim=1) if groups > 1 else packed
            state = to_internal(packed.reshape(b * h, -1, dv + 1), f).contiguous()
        else:
            state = q.new_zeros(b * h, dc, dv + 1, dtype=torch.float32)
        keep_u8 = keep.to(torch.uint8).contiguous() if keep is not None else None
        if encoder is not None:
            k_enc, v_enc, lengths = encoder
            in_prefix = prefix_positions(lengths, t, keep)
            hit = in_prefix.any(dim=0).nonzero()
            cut = int(hit[-1]) + 1 if hit.numel() else 0
            if cut:  # the encoder sum, over the positions up to the last prefix token of any sequence
                _run(lib, b * h, h, groups, None, _ready(k_enc[:, :cut]), _ready(v_enc[:, :cut]),
                     in_prefix[:, :cut].to(torch.uint8).contiguous(), None, eps, state)
        o = _empty_output(b, t, h, dv)
        _run(lib, b * h, h, groups, _ready(q), _ready(k), _ready(v), keep_u8, o, eps, state)
        final = None
        if output_final_state:
            full = to_full(state, f).reshape(b, h, -1, dv + 1)[:, ::groups]
            final = (full[..., :-1], full[..., -1])
    return o.to(v.dtype), final
