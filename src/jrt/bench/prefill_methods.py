"""The methods of ``jrt bench prefill``: one registry, FLOP models and one timer per device type.

Every method builds a :class:`Case` (a callable plus its FLOP count, prompt tokens and minimum memory traffic)
for a :class:`Shape`, through one of two backends:

* ``"ops"`` - the library's operators as a user calls them (:mod:`jrt.ops` with an ``impl``; any device);
* ``"kernels"`` - the CUDA kernels called directly: ``scaled_dot_product_attention`` on the flash backend
  (FlashAttention-2), the Triton kernels of :mod:`jrt.ops.triton`, flash-linear-attention's Based kernels.

Methods (at prompt length ``T``): ``sdpa`` (causal softmax attention over ``T``: the baseline), ``jrt_prompt``
(causal linear attention over ``2T``: the prompt read twice), ``jrt_rnn`` (prefix linear attention over ``T``
with prefix ``T/2``), ``jrt_prompt_products`` (only the batched products of the chunked form over ``2T``: the
ceiling of the ``% mm`` column), ``based`` (causal linear attention over ``T``) and ``fla_fused_chunk_based`` /
``fla_parallel_based`` (flash-linear-attention's kernels over ``T``).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jrt.ops import linear_attention, prefix_linear_attention
from jrt.ops.feature_map import feature_dim

# ------------------------------------------------------------------------------------------------ FLOP models
#
# Only the products of the algorithms count (elementwise work is free in these models), so that a method's
# FLOP rate divided by the same run's matrix-multiply rate says how close it runs to the machine's limit.
#
# * Causal softmax attention (``sdpa``): ``Q K^T`` and ``P V`` over the lower triangle, ``2 * 2 * T^2/2 * Dh``
#   per (sequence, head).
# * The chunked linear attention (the minimal count of the chunked algorithm with chunks of ``C = 64`` and the
#   compressed feature space, ``Dc = 1+F+F(F+1)/2``), per token: the state update ``phi(k) [v, 1]^T`` and the
#   state read ``phi(q) . S``, ``2 * 2 * Dc * (Dv+1)``, plus the intra-chunk products over the lower triangle
#   of each chunk (diagonal included), ``q.k`` and ``scores @ [v, 1]``: ``2 * (C+1)/2 * (F + Dv+1)``. The
#   prefix operator adds the encoder state, ``2 * Dc * (Dv+1)`` per prefix token. With F = 16, Dv = 64:
#   45,045 FLOPs per token and 19,890 per prefix token. The count does not depend on the chunk the
#   implementation uses: a larger chunk computes more products, none of which is counted.
# * Forward + backward: the backward pass of a product ``A B`` is two products of the same size, so linear
#   attention's forward + backward is 3x its forward; FlashAttention-2's backward recomputes ``Q K^T`` too
#   (five products to the forward's two), so softmax attention's forward + backward is 3.5x its forward.

#: Chunk length of the FLOP model of the chunked linear attention.
MODEL_CHUNK = 64
#: Forward + backward FLOPs over forward FLOPs: linear attention (chunked form and kernels), softmax attention.
BACKWARD_FACTOR = {"linear": 3.0, "sdpa": 3.5}


def sdpa_flops(batch: int, heads: int, length: int, head_dim: int) -> float:
    """Causal softmax attention: ``QK^T`` and ``PV`` over the lower triangle (2 * 2 * T^2/2 * Dh per head)."""
    return 2.0 * batch * heads * length * length * head_dim


def linear_attention_flops(batch: int, heads: int, length: int, f: int, dv: int, chunk: int = MODEL_CHUNK) -> float:
    """Causal linear attention, the minimal count of the chunked algorithm: per token the state update and read
    in the compressed feature space, ``4 * Dc * (Dv+1)``, and the intra-chunk products over the lower triangle,
    ``(C+1) * (F + Dv+1)`` (``Dc = 1+F+F(F+1)/2``, ``C = 64``)."""
    d = feature_dim(f, compressed=True)
    per_token = 4 * d * (dv + 1) + (chunk + 1) * (f + dv + 1)
    return float(batch * heads * length * per_token)


def prefix_flops(batch: int, heads: int, length: int, prefix: int, f: int, dv: int, chunk: int = MODEL_CHUNK) -> float:
    """Prefix linear attention: the causal pass (:func:`linear_attention_flops`) plus the encoder state over the
    prefix, ``2 * Dc * (Dv+1)`` per prefix token."""
    d = feature_dim(f, compressed=True)
    return linear_attention_flops(batch, heads, length, f, dv, chunk) + 2.0 * batch * heads * prefix * d * (dv + 1)


def kernel_flops(b: int, h: int, t: int, f: int, dv: int, chunk: int = 16, prefix: int = 0) -> float:
    """Linear attention in the Triton kernels: ``B*H*T * (4*D*Dv + 2*C*(F+Dv))`` with the full ``D = 1+F+F^2``
    (state read and update per token, intra-chunk products with chunk ``C``), plus ``2*D*Dv`` per prefix token
    for the encoder state."""
    d = 1 + f + f * f
    return b * h * (t * (4 * d * dv + 2 * chunk * (f + dv)) + prefix * 2 * d * dv)


# ------------------------------------------------------------------------------------------------ timers


class _RssSampler:
    """Peak growth of the resident set size while running, sampled every millisecond (Linux ``/proc``)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.available = os.path.exists("/proc/self/statm")
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def __enter__(self) -> _RssSampler:
        if self.available:
            self.base = self._rss()
            self.peak = self.base
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int | None:
        return self.peak - self.base if self.available else None


def time_cpu(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> tuple[float, int | None]:
    """Median seconds of ``fn()`` (wall clock) over ``repeats`` calls after ``warmup`` calls, and the growth of
    the resident set during the first timed call (sampled)."""
    for _ in range(warmup):
        fn()
    times, peak = [], None
    for i in range(repeats):
        if i == 0:
            with _RssSampler() as sampler:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            peak = sampler.growth
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def time_cuda(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> tuple[float, int | None]:
    """Median seconds of ``fn()`` on the current CUDA stream (CUDA events) over ``repeats`` calls after ``warmup``
    calls, and the allocator's peak above the memory allocated before."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(stop) / 1000.0)
    return statistics.median(times), torch.cuda.max_memory_allocated(device) - base


#: One timer per device type: ``timer(fn, device, repeats, warmup) -> (median seconds, peak bytes or None)``.
TIMERS: dict[str, Callable] = {"cpu": time_cpu, "cuda": time_cuda}


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> tuple[float, int | None]:
    """The timer of ``device``'s type (:data:`TIMERS`)."""
    if device.type not in TIMERS:
        raise ValueError(f"no timer for device type {device.type!r}; choose among {', '.join(TIMERS)}")
    return TIMERS[device.type](fn, device, repeats, warmup)


# ------------------------------------------------------------------------------------------------ the registry


@dataclass
class Shape:
    """One benchmark point: ``batch`` sequences, ``heads`` heads, prompt ``length`` T, query/key ``feature`` dim F
    and ``head_dim`` (sdpa head dim and value dim Dv), on ``device`` in ``dtype``; ``impl`` for the ops backend;
    ``backward``: time forward + backward (a gradient of ones on the output) instead of the forward alone."""

    batch: int
    heads: int
    length: int
    feature: int
    head_dim: int
    device: torch.device
    dtype: torch.dtype
    impl: str = "auto"
    backward: bool = False


@dataclass
class Case:
    """A prepared call: ``run()`` is what is timed; ``flops`` its model FLOPs, ``tokens`` the prompt tokens it
    stands for (``B * T``), ``nbytes`` the minimum traffic (every input read once, the output written once)."""

    run: Callable[[], object]
    flops: float
    tokens: int
    nbytes: int


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _prepared(forward: Callable[[], object], inputs: tuple[torch.Tensor, ...], backward: bool) -> Callable[[], object]:
    """The timed call: ``forward()`` without autograd, or (``backward``) forward and backward with respect to
    ``inputs`` (made leaves that require a gradient here), with a gradient of ones on the output."""
    if not backward:
        def call() -> object:
            with torch.no_grad():
                return forward()

        return call
    for x in inputs:
        x.requires_grad_(True)

    def call_backward() -> object:
        for x in inputs:
            x.grad = None
        out = forward()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
        return out

    return call_backward


def _flops(forward_flops: float, kind: str, s: Shape) -> float:
    return forward_flops * (BACKWARD_FACTOR[kind] if s.backward else 1.0)


class _Inputs:
    """Random inputs from a fixed seed (CPU generator for the ops backend, the device's for the kernels)."""

    def __init__(self, shape: Shape, on_device: bool) -> None:
        self.shape = shape
        device = shape.device if on_device else torch.device("cpu")
        self.on_device = on_device
        self.gen = torch.Generator(device=device).manual_seed(0)

    def __call__(self, *dims: int, scale: float = 1.0) -> torch.Tensor:
        s = self.shape
        if self.on_device:
            x = torch.randn(*dims, device=s.device, dtype=torch.float32, generator=self.gen) * scale
            return x.to(s.dtype)
        return torch.randn(*dims, generator=self.gen).to(device=s.device, dtype=s.dtype)


def _sdpa_ops(s: Shape) -> Case:
    randn = _Inputs(s, on_device=False)
    q, k, v = (randn(s.batch, s.heads, s.length, s.head_dim) for _ in range(3))
    run = _prepared(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), s.backward)
    flops = _flops(sdpa_flops(s.batch, s.heads, s.length, s.head_dim), "sdpa", s)
    return Case(run, flops, s.batch * s.length, _nbytes(q, k, v, v))


def _linear_ops(s: Shape, length: int) -> Case:
    randn = _Inputs(s, on_device=False)
    q, k = randn(s.batch, length, s.heads, s.feature), randn(s.batch, length, s.heads, s.feature)
    v = randn(s.batch, length, s.heads, s.head_dim)
    run = _prepared(lambda: linear_attention(q, k, v, impl=s.impl), (q, k, v), s.backward)
    flops = _flops(linear_attention_flops(s.batch, s.heads, length, s.feature, s.head_dim), "linear", s)
    return Case(run, flops, s.batch * s.length, _nbytes(q, k, v, v))


def _prefix_ops(s: Shape) -> Case:
    randn = _Inputs(s, on_device=False)
    t = s.length
    q, k, ke = (randn(s.batch, t, s.heads, s.feature) for _ in range(3))
    v, ve = randn(s.batch, t, s.heads, s.head_dim), randn(s.batch, t, s.heads, s.head_dim)
    lengths = torch.full((s.batch,), t // 2, dtype=torch.long, device=s.device)
    run = _prepared(lambda: prefix_linear_attention(q, k, v, ke, ve, lengths, impl=s.impl), (q, k, v, ke, ve),
                    s.backward)
    flops = _flops(prefix_flops(s.batch, s.heads, t, t // 2, s.feature, s.head_dim), "linear", s)
    return Case(run, flops, s.batch * t, _nbytes(q, k, v, ke, ve, v))


def _products_ops(s: Shape) -> Case:
    """``jrt_prompt_products``: only the four batched products of the chunked form over ``2T`` tokens, at its chunk
    (:data:`jrt.ops.based.chunk.CHUNK_SIZE`) and segment (``SEGMENT_SIZE`` tokens per block) sizes, on reused
    buffers: ``scores = Q K^T``, ``o = scores [V, 1]``, the chunk states ``phi(K)^T [V, 1]`` and the read
    ``o += phi(Q) states``. No feature map, mask, prefix sum or division: the time any implementation that issues
    these library products separately needs at least, so its ``% mm`` is the ceiling of such an implementation."""
    from jrt.ops.based import chunk

    if s.backward:
        raise ValueError("jrt_prompt_products times the forward products only (no --backward)")
    c, dc, dv1 = chunk.CHUNK_SIZE, feature_dim(s.feature, compressed=True), s.head_dim + 1
    rows = max(1, chunk.SEGMENT_SIZE // c)  # chunks per block
    total = s.batch * s.heads * -(-2 * s.length // c)
    rows = min(rows, total)
    sizes = [rows] * (total // rows) + ([total % rows] if total % rows else [])  # exactly `total` chunks
    randn = _Inputs(s, on_device=False)
    qt, kt = randn(rows, c, s.feature), randn(rows, s.feature, c)
    v1, fq, fk = randn(rows, c, dv1), randn(rows, c, dc), randn(rows, dc, c)
    scores, o1, states = (torch.empty(rows, c, c, dtype=s.dtype, device=s.device),
                          torch.empty(rows, c, dv1, dtype=s.dtype, device=s.device),
                          torch.empty(rows, dc, dv1, dtype=s.dtype, device=s.device))

    def run() -> None:
        with torch.no_grad():
            for n in sizes:
                torch.bmm(qt[:n], kt[:n], out=scores[:n])
                torch.bmm(scores[:n], v1[:n], out=o1[:n])
                torch.bmm(fk[:n], v1[:n], out=states[:n])
                o1[:n].baddbmm_(fq[:n], states[:n])

    flops = linear_attention_flops(s.batch, s.heads, 2 * s.length, s.feature, s.head_dim)
    return Case(run, flops, s.batch * s.length, 0)


def _sdpa_flash(s: Shape) -> Case:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    randn = _Inputs(s, on_device=True)
    q, k, v = (randn(s.batch, s.heads, s.length, s.head_dim) for _ in range(3))

    def forward():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # forward and backward: FlashAttention-2
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    flops = _flops(sdpa_flops(s.batch, s.heads, s.length, s.head_dim), "sdpa", s)
    return Case(_prepared(forward, (q, k, v), s.backward), flops, s.batch * s.length, _nbytes(q, k, v, v))


def _linear_kernel(s: Shape, length: int) -> Case:
    import jrt.ops.triton as kernels

    randn = _Inputs(s, on_device=True)
    q, k = randn(s.batch, length, s.heads, s.feature, scale=0.5), randn(s.batch, length, s.heads, s.feature, scale=0.5)
    v = randn(s.batch, length, s.heads, s.head_dim)
    flops = _flops(kernel_flops(s.batch, s.heads, length, s.feature, s.head_dim), "linear", s)
    run = _prepared(lambda: kernels.linear_attention(q, k, v), (q, k, v), s.backward)
    return Case(run, flops, s.batch * s.length, _nbytes(q, k, v, v))


def _prefix_kernel(s: Shape) -> Case:
    import jrt.ops.triton as kernels

    randn = _Inputs(s, on_device=True)
    t = s.length
    q, k = randn(s.batch, t, s.heads, s.feature, scale=0.5), randn(s.batch, t, s.heads, s.feature, scale=0.5)
    v = randn(s.batch, t, s.heads, s.head_dim)
    ke, ve = randn(s.batch, t, s.heads, s.feature, scale=0.5), randn(s.batch, t, s.heads, s.head_dim)
    prefix = torch.full((s.batch,), t // 2, device=s.device, dtype=torch.long)
    flops = _flops(kernel_flops(s.batch, s.heads, t, s.feature, s.head_dim, prefix=t // 2), "linear", s)
    run = _prepared(lambda: kernels.prefix_linear_attention(q, k, v, ke, ve, prefix), (q, k, v, ke, ve), s.backward)
    return Case(run, flops, s.batch * t, _nbytes(q, k, v, ke, ve, v))


def fla_based_ops() -> dict[str, Callable]:
    """flash-linear-attention's Based kernels by method name, when ``fla`` imports (``[B, T, H, F]`` layout)."""
    try:
        from fla.ops.based import fused_chunk_based, parallel_based
    except Exception:  # not installed, or an incompatible version
        return {}
    return {"fla_fused_chunk_based": fused_chunk_based, "fla_parallel_based": parallel_based}


def _fla_kernel(name: str) -> Callable[[Shape], Case]:
    def build(s: Shape) -> Case:
        op = fla_based_ops().get(name)
        if op is None:
            raise ValueError(f"{name} needs flash-linear-attention (pip install fla-core)")
        randn = _Inputs(s, on_device=True)
        q = randn(s.batch, s.length, s.heads, s.feature, scale=0.5)
        k = randn(s.batch, s.length, s.heads, s.feature, scale=0.5)
        v = randn(s.batch, s.length, s.heads, s.head_dim)

        def forward():
            # fla >= 0.2 takes [B, T, H, *]; some releases had a head_first flag that must then be False
            try:
                return op(q, k, v, head_first=False)
            except TypeError:
                return op(q, k, v)

        flops = _flops(kernel_flops(s.batch, s.heads, s.length, s.feature, s.head_dim), "linear", s)
        return Case(_prepared(forward, (q, k, v), s.backward), flops, s.batch * s.length, _nbytes(q, k, v, v))

    return build


#: The one method registry: method name -> backend (``"ops"`` or ``"kernels"``) -> builder ``Shape -> Case``.
#: Table order is this order (``sdpa`` first, so that later rows at the same T get their speed-up).
METHODS: dict[str, dict[str, Callable[[Shape], Case]]] = {
    "sdpa": {"ops": _sdpa_ops, "kernels": _sdpa_flash},
    "jrt_prompt": {"ops": lambda s: _linear_ops(s, 2 * s.length), "kernels": lambda s: _linear_kernel(s, 2 * s.length)},
    "jrt_rnn": {"ops": _prefix_ops, "kernels": _prefix_kernel},
    "jrt_prompt_products": {"ops": _products_ops},
    "based": {"kernels": lambda s: _linear_kernel(s, s.length)},
    "fla_fused_chunk_based": {"kernels": _fla_kernel("fla_fused_chunk_based")},
    "fla_parallel_based": {"kernels": _fla_kernel("fla_parallel_based")},
}


def methods_of(backend: str) -> tuple[str, ...]:
    """The methods that ``backend`` can run, in table order."""
    return tuple(name for name, builders in METHODS.items() if backend in builders)


def build(method: str, backend: str, shape: Shape) -> Case:
    """The :class:`Case` of ``method`` on ``backend`` at ``shape``.

    Raises:
        ValueError: unknown method, or one the backend cannot run.
    """
    builders = METHODS.get(method)
    if builders is None or backend not in builders:
        raise ValueError(f"unknown {backend} prefill method {method!r}; choose among {', '.join(methods_of(backend))}")
    return builders[backend](shape)
