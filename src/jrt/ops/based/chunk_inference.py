"""The chunked form for inference (no autograd): the computation of :mod:`.chunk` with every product and feature
written in place into buffers made once per block (``out=``, ``baddbmm_``), the exclusive prefix sum of the chunk
states as a loop of in-place adds, and the division by the denominator done segment by segment while the
numerator is in cache, straight into the public ``[B, T, H, Dv]`` layout. A long sequence runs in blocks of
several heads (one block per CPU thread) so that each product is batched over heads and chunks; on a multi-core
CPU the independent blocks run on a pool of single-threaded workers (one block per thread beats splitting every
small product across threads).

No global setting changes: the workers set their own torch thread count once when the pool starts, and the
default that threads created later inherit is put back before the pool is used.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from jrt.ops.based.chunk import exclusive_prefix, features, split
from jrt.ops.feature_map import feature_dim

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
        inference = torch.is_inference_mode_enabled()

        def in_worker(span: tuple[int, int]) -> torch.Tensor:
            # grad and inference mode are per thread: a caller under torch.inference_mode() (as generate() is)
            # hands over inference tensors, which only a thread in inference mode may write to.
            with torch.inference_mode(inference), torch.no_grad():
                return fn(*span)

        return list(single_threaded_workers(threads).map(in_worker, spans))
    return [fn(g0, g1) for g0, g1 in spans]


def _row_runs(g0: int, g1: int, heads: int):
    """Rows ``g0:g1`` of ``B*H`` as runs of one sequence: ``(b, h0, h1, r0, r1)`` (rows ``r0:r1`` of the block)."""
    g = g0
    while g < g1:
        b, h0 = divmod(g, heads)
        h1 = min(heads, h0 + g1 - g)
        yield b, h0, h1, g - g0, g - g0 + h1 - h0
        g += h1 - h0


@torch.no_grad()
def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v1: torch.Tensor,
    state0: torch.Tensor | None = None,
    encoder: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float | None = None,
    chunk_size: int | None = None,
    segment_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract and results as :func:`jrt.ops.based.chunk.forward`; records nothing for autograd.

    With ``eps`` the division is done here, segment by segment while the numerator is in cache, and the first
    result is ``o [B, T, H, Dv] = o1[..., :-1] / (o1[..., -1:] + eps)`` in the public layout. ``chunk_size``
    and ``segment_size`` override :data:`~jrt.ops.based.chunk.CHUNK_SIZE` and
    :data:`~jrt.ops.based.chunk.SEGMENT_SIZE`.
    """
    blocks = split(q, k, v1, state0, encoder, chunk_size, segment_size)
    (b, heads, t), n_chunks = blocks.shape, blocks.n_chunks
    f, c, dv1 = blocks.qt.shape[-2], blocks.qt.shape[-1], v1.shape[-1]
    dc = feature_dim(f, compressed=True)
    if eps is None:
        result = q.new_empty(b * heads, n_chunks * c, dv1)  # o1, rows of (sequence, head)
    else:
        result = q.new_empty(b, t, heads, dv1 - 1)

    def run_block(g0: int, g1: int) -> torch.Tensor:
        """Rows ``g0:g1`` over all segments; returns their final running state ``[G, Dc, Dv+1]``.

        The buffers are made once per block and segment length (at most two: the last segment may be shorter)."""
        g = g1 - g0
        buffers: dict[int, tuple[torch.Tensor, ...]] = {}
        state = blocks.start_state(g0, g1)
        for start in range(0, n_chunks, blocks.per_segment):
            stop = min(start + blocks.per_segment, n_chunks)
            n = stop - start
            if n not in buffers:  # scores, features, chunk states, prefix states, o1
                buffers[n] = (q.new_empty(g * n, c, c), q.new_empty(g * n, dc, c), q.new_empty(g, n, dc, dv1),
                              q.new_empty(g, n, dc, dv1), q.new_empty(g, n * c, dv1))
            scores_buf, feat_buf, states_buf, before_buf, o1_buf = buffers[n]
            qt, kt = (x[g0:g1, start:stop].reshape(g * n, f, c) for x in (blocks.qt, blocks.kt))
            vc = blocks.values(g0, g1, start, stop)  # [G*n, C, Dv+1]
            scores = torch.bmm(qt.transpose(1, 2), kt, out=scores_buf)
            scores.addcmul_(scores, scores, value=0.5).add_(1.0).tril_()
            o1 = torch.bmm(scores, vc, out=o1_buf.view(g * n, c, dv1))
            fk = features(kt, halve=True, out=feat_buf)
            torch.bmm(fk, vc, out=states_buf.view(g * n, dc, dv1))  # the chunk states
            before, state = exclusive_prefix(state, states_buf, out=before_buf)
            fq = features(qt, out=feat_buf)
            o1.baddbmm_(fq.transpose(1, 2), before.view(g * n, dc, dv1))
            t0, t1 = start * c, min(stop * c, t)
            if eps is None:
                result[g0:g1, start * c : stop * c].copy_(o1_buf)
                continue
            for bi, h0, h1, r0, r1 in _row_runs(g0, g1, heads):  # numerator over denominator, public layout
                rows = o1_buf[r0:r1, : t1 - t0].transpose(0, 1)  # [N, Hs, Dv+1]
                torch.div(rows[..., :-1], rows[..., -1:] + eps, out=result[bi, t0:t1, h0:h1])
        return state

    finals = run_blocks(run_block, blocks.spans, q.device)
    if eps is None:
        return result.view(b, heads, -1, dv1)[:, :, :t], blocks.final_state(finals)
    return result, blocks.final_state(finals)
