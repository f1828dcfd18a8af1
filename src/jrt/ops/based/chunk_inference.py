"""The chunked form for inference (no autograd): the computation of :mod:`.chunk` with products written in place
(``out=``, ``baddbmm_``), a loop of adds instead of ``cumsum`` for the prefix sums, and, on a multi-core CPU,
the independent blocks of (sequence, head) rows run on a pool of single-threaded workers (one block per thread
beats splitting every small product across threads).

No global setting changes: the workers set their own torch thread count once when the pool starts, and the
default that threads created later inherit is put back before the pool is used.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from jrt.ops.based.chunk import split
from jrt.ops.feature_map import monomials

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def single_threaded_workers(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``n`` worker threads, each running torch operations on one thread.

    ``torch.set_num_threads`` sets the calling thread's OpenMP/MKL thread count and the default that threads
    created later copy: each worker sets its own count to 1 when the pool starts, then the default is restored.
    """
    with _POOLS_LOCK:
        pool = _POOLS.get(n)
        if pool is None:
            default = torch.get_num_threads()
            pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="jrt-chunk")
            started = threading.Barrier(n)  # n tasks waiting together: n distinct threads

            def start() -> None:
                torch.get_num_threads()  # initialises this thread's settings from the default
                torch.set_num_threads(1)
                started.wait()

            for future in [pool.submit(start) for _ in range(n)]:
                future.result()
            torch.set_num_threads(default)
            _POOLS[n] = pool
    return pool


def run_blocks(fn: Callable[[int, int], torch.Tensor], spans: list[tuple[int, int]], device: torch.device):
    """``[fn(g0, g1) for (g0, g1) in spans]``, on the worker pool when it pays off (CPU, several threads and
    blocks)."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1 and len(spans) > 1:
        def in_worker(span: tuple[int, int]) -> torch.Tensor:
            with torch.no_grad():  # grad mode is per thread
                return fn(*span)

        return list(single_threaded_workers(threads).map(in_worker, spans))
    return [fn(g0, g1) for g0, g1 in spans]


@torch.no_grad()
def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v1: torch.Tensor,
    state0: torch.Tensor | None = None,
    encoder: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract and results as :func:`jrt.ops.based.chunk.forward`; records nothing for autograd."""
    blocks = split(q, k, v1, state0, encoder)
    outputs = torch.empty_like(blocks.v1)
    c, dv1 = blocks.v1.shape[-2], blocks.v1.shape[-1]

    def run_block(g0: int, g1: int) -> torch.Tensor:
        """Rows ``g0:g1`` over all segments; returns their final running state ``[G, Dc, Dv+1]``."""
        state = blocks.start_state(g0, g1)
        for start in range(0, blocks.n_chunks, blocks.per_segment):
            stop = min(start + blocks.per_segment, blocks.n_chunks)
            qc, kc, vc = (x[g0:g1, start:stop] for x in (blocks.q, blocks.k, blocks.v1))  # [G, n, C, *]
            scores = qc @ kc.transpose(-1, -2)
            scores = torch.addcmul(scores, scores, scores, value=0.5).add_(1.0).tril_()
            o1 = torch.matmul(scores, vc, out=outputs[g0:g1, start:stop])
            chunk_states = monomials(kc).transpose(-1, -2) @ vc  # [G, n, Dc, Dv+1]
            chunk_states.mul_(blocks.halving)
            before = torch.empty_like(chunk_states)
            running = state
            for j in range(chunk_states.shape[1]):  # a loop of adds beats cumsum over a leading dim
                before[:, j] = running
                running = running + chunk_states[:, j]
            state = running
            dc = before.shape[-2]
            o1.view(-1, c, dv1).baddbmm_(monomials(qc).view(-1, c, dc), before.view(-1, dc, dv1))
        return state

    return blocks.finish(outputs, run_blocks(run_block, blocks.spans, q.device))
