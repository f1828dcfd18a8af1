"""The CUDA part of ``jrt bench prefill --device cuda``: prefill throughput on a GPU against FlashAttention-2.

Methods, each timed with CUDA events (median of ``repeats`` after ``warmup`` runs), bfloat16, batch ``B``,
``H`` heads of head dim 64 (``F = 16`` feature dim for the linear-attention methods), at prompt length ``T``:

* ``sdpa`` - softmax attention through ``torch.nn.functional.scaled_dot_product_attention`` restricted to
  the flash backend (FlashAttention-2), causal, at length ``T``: the baseline.
* ``jrt_prompt`` - JRT-Prompt: Based linear attention (the ``jrt.ops.triton`` kernels) over the doubled
  prompt, length ``2T``.
* ``jrt_rnn`` - JRT-RNN: prefix linear attention at length ``T`` with prefix ``T/2`` (encoder state, then
  the causal pass).
* ``based`` - Based linear attention at length ``T`` (our kernel at the flash-linear-attention shape);
  ``based_vmajor`` the same with the causal kernel's other state layout (``state_layout="v_major"``), to
  choose the default from measurements.
* ``fla_fused_chunk_based`` / ``fla_parallel_based`` - flash-linear-attention's Based kernels at length
  ``T``, when ``fla`` is installed.

Per row: median milliseconds, tokens per second (``B * T`` prompt tokens; JRT-Prompt reads ``T`` prompt
tokens twice), the speed-up ``sdpa / method`` at the same ``T``, and the achieved model FLOP rate next to
the device's measured bfloat16 matrix-product ceiling. FLOP models: softmax causal ``2 * 2 * B*H*T^2*d / 2``;
linear attention ``B*H*T * (4*D*Dv + 2*C*(F+Dv))`` with ``D = 1+F+F^2`` (state read and update per token,
intra-chunk products with chunk ``C = 16``), plus ``2*D*Dv`` per prefix token for the encoder state.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from jrt.bench import write_json

#: Methods measured on CUDA, in table order.
CUDA_METHODS = (
    "sdpa", "jrt_prompt", "jrt_rnn", "based", "based_vmajor", "fla_fused_chunk_based", "fla_parallel_based",
)
DEFAULT_LENGTHS = (2048, 4096, 8192, 16384, 32768)


def cuda_time_ms(fn: Callable[[], object], warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` on the current CUDA stream, in milliseconds (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def device_ceilings(device: torch.device, size: int = 8192) -> dict[str, float]:
    """Measured ceilings: bfloat16 matrix-product TFLOP/s (``size^3``) and device-to-device copy GB/s."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    ms = cuda_time_ms(lambda: a @ b, warmup=3, repeats=10)
    x = torch.empty(2**30 // 2, device=device, dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    copy_ms = cuda_time_ms(lambda: y.copy_(x), warmup=3, repeats=10)
    return {
        "matmul_bf16_tflops": 2 * size**3 / ms / 1e9,
        "copy_gbps": 2 * x.numel() * x.element_size() / copy_ms / 1e6,
    }


def _fla_ops() -> dict[str, Callable]:
    """flash-linear-attention's Based kernels, when ``fla`` imports (``[B, T, H, F]`` layout)."""
    try:
        from fla.ops.based import fused_chunk_based, parallel_based
    except Exception:  # not installed, or an incompatible version
        return {}
    return {"fla_fused_chunk_based": fused_chunk_based, "fla_parallel_based": parallel_based}


def _call_fla(op: Callable, q, k, v):
    # fla >= 0.2 takes [B, T, H, *]; some releases had a head_first flag that must then be False
    try:
        return op(q, k, v, head_first=False)
    except TypeError:
        return op(q, k, v)


def linear_flops(b: int, h: int, t: int, f: int, dv: int, chunk: int = 16, prefix: int = 0) -> float:
    d = 1 + f + f * f
    return b * h * (t * (4 * d * dv + 2 * chunk * (f + dv)) + prefix * 2 * d * dv)


def sdpa_flops(b: int, h: int, t: int, d: int) -> float:
    return 2 * 2 * b * h * t * t * d / 2


def _make_case(method: str, b: int, h: int, t: int, f: int, d: int, device, dtype, fla: dict):
    """``(callable, flops, prompt tokens, bytes)`` for one method at prompt length ``t``; ``bytes`` is the
    minimum traffic: every input read once and the output written once."""
    import jrt.ops.triton as kernels

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32, generator=gen) * scale).to(dtype)

    if method == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = (randn(b, h, t, d) for _ in range(3))

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        return run, sdpa_flops(b, h, t, d), b * t, _nbytes(q, k, v, v)
    length = 2 * t if method == "jrt_prompt" else t
    q, k = randn(b, length, h, f, scale=0.5), randn(b, length, h, f, scale=0.5)
    v = randn(b, length, h, d)
    if method in ("jrt_prompt", "based", "based_vmajor"):
        layout = "v_major" if method == "based_vmajor" else None
        run = lambda: kernels.linear_attention(q, k, v, state_layout=layout)  # noqa: E731
        return run, linear_flops(b, h, length, f, d), b * t, _nbytes(q, k, v, v)
    if method == "jrt_rnn":
        ke, ve = randn(b, t, h, f, scale=0.5), randn(b, t, h, d)
        prefix = torch.full((b,), t // 2, device=device, dtype=torch.long)
        run = lambda: kernels.prefix_linear_attention(q, k, v, ke, ve, prefix)  # noqa: E731
        return run, linear_flops(b, h, t, f, d, prefix=t // 2), b * t, _nbytes(q, k, v, ke, ve, v)
    if method in fla:
        op = fla[method]
        return (lambda: _call_fla(op, q, k, v)), linear_flops(b, h, t, f, d), b * t, _nbytes(q, k, v, v)
    raise ValueError(f"unknown or unavailable CUDA method {method!r}")


def run_cuda_prefill(
    lengths: tuple[int, ...] = DEFAULT_LENGTHS,
    batch: int = 16,
    heads: int = 16,
    head_dim: int = 64,
    feature_dim: int = 16,
    methods: tuple[str, ...] = CUDA_METHODS,
    warmup: int = 2,
    repeats: int = 5,
    device: str | torch.device = "cuda",
    progress: bool = True,
) -> dict:
    """Time every available method at every length. Returns ``{"device", "ceilings", "rows"}``; each row has
    ``method, T, batch, heads, ms, tokens_per_s, tflops, gbps, speedup_vs_sdpa`` (``None`` when not measured),
    and ``autotuned``: the launch configuration the autotuner chose for each Triton kernel."""
    if not torch.cuda.is_available():
        raise ValueError("the CUDA prefill benchmark needs a CUDA device (torch.cuda.is_available() is False)")
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"run_cuda_prefill needs a CUDA device, got {device}")
    fla = _fla_ops()
    unknown = sorted(set(methods) - set(CUDA_METHODS))
    if unknown:
        raise ValueError(f"unknown CUDA prefill methods {unknown}; choose from {', '.join(CUDA_METHODS)}")
    # table order (sdpa first, so that every later row at the same T gets its speed-up)
    wanted = [m for m in CUDA_METHODS if m in methods and (not m.startswith("fla_") or m in fla)]
    skipped = sorted(set(methods) - set(wanted))
    ceilings = device_ceilings(device)
    rows = []
    try:
        from tqdm import tqdm

        steps = tqdm(total=len(lengths) * len(wanted), desc="prefill (cuda)", disable=not progress)
    except ImportError:  # pragma: no cover
        steps = None
    for t in lengths:
        sdpa_ms = None
        for method in wanted:
            row = {"method": method, "T": t, "batch": batch, "heads": heads, "ms": None, "tokens_per_s": None,
                   "tflops": None, "gbps": None, "speedup_vs_sdpa": None, "error": None}
            try:
                fn, flops, tokens, nbytes = _make_case(method, batch, heads, t, feature_dim, head_dim, device,
                                               torch.bfloat16, fla)
                ms = cuda_time_ms(fn, warmup=warmup, repeats=repeats)
                row.update(ms=ms, tokens_per_s=tokens / ms * 1e3, tflops=flops / ms / 1e9, gbps=nbytes / ms / 1e6)
                if method == "sdpa":
                    sdpa_ms = ms
                if sdpa_ms is not None:
                    row["speedup_vs_sdpa"] = sdpa_ms / ms
            except torch.cuda.OutOfMemoryError as exc:
                row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
            except Exception as exc:  # keep the table going; the error is reported in its row
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            finally:
                torch.cuda.empty_cache()
            rows.append(row)
            if steps is not None:
                steps.update()
    if steps is not None:
        steps.close()
    return {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "ceilings": ceilings,
        "skipped_methods": skipped,
        "config": {"batch": batch, "heads": heads, "head_dim": head_dim, "feature_dim": feature_dim,
                   "dtype": "bfloat16", "warmup": warmup, "repeats": repeats},
        "autotuned": _autotuned(),
        "rows": rows,
    }


def _autotuned() -> dict[str, str]:
    """The configurations the autotuner picked (last key tuned), for the record."""
    from jrt.ops.triton import _ops

    chosen = {}
    for name in _ops._CUDA_CONFIGS:
        best = getattr(_ops._tuned(name), "best_config", None)
        chosen[name] = str(best) if best is not None else "not tuned"
    return chosen


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(result: dict) -> str:
    """The result as a Markdown section body: ceilings, then one table row per (T, method)."""
    c = result["ceilings"]
    lines = [
        f"Device: {result['device']} (torch {result['torch']}); measured ceilings: bf16 matmul "
        f"{c['matmul_bf16_tflops']:.0f} TFLOP/s, device copy {c['copy_gbps']:.0f} GB/s. "
        f"Config: {json.dumps(result['config'])}.",
        "",
        "| T | method | ms (median) | prompt tokens/s | model TFLOP/s (% of matmul) | min. traffic GB/s (% of copy) "
        "| sdpa / method |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        if r["error"]:
            lines.append(f"| {r['T']} | {r['method']} | {r['error']} | | | | |")
            continue
        share = 100 * r["tflops"] / c["matmul_bf16_tflops"]
        bw = r.get("gbps")
        bw_text = "-" if bw is None else f"{bw:.0f} ({100 * bw / c['copy_gbps']:.1f}%)"
        lines.append(
            f"| {r['T']} | {r['method']} | {_fmt(r['ms'], '.3f')} | {_fmt(r['tokens_per_s'], '.3g')} | "
            f"{r['tflops']:.1f} ({share:.1f}%) | {bw_text} | {_fmt(r['speedup_vs_sdpa'], '.2f')} |"
        )
    if result.get("autotuned"):
        lines += ["", "Autotuned: " + "; ".join(f"{k}: {v}" for k, v in result["autotuned"].items()) + "."]
    if result.get("skipped_methods"):
        lines += ["", f"Not measured (not installed): {', '.join(result['skipped_methods'])}."]
    return "\n".join(lines) + "\n"


def add_cuda_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the stand-alone entry; the same names and formats as ``jrt bench prefill``."""
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                        help="comma-separated prompt lengths T (default: 2048,...,32768)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64, help="head dim of sdpa and value dim Dv (default 64)")
    parser.add_argument("--feature-dim", type=int, default=16, help="query/key feature dim F (default 16)")
    parser.add_argument("--methods", default=",".join(CUDA_METHODS), help=f"subset of {','.join(CUDA_METHODS)}")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None,
                        help="write the result as JSON here (and the Markdown table beside it, .md)")


def _split(text: str, name: str, cast=str) -> list:
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be a comma-separated list, got {text!r}") from None


def run_and_write(
    lengths: list[int], methods: tuple[str, ...], *, batch: int, heads: int, head_dim: int, feature_dim: int,
    warmup: int, repeats: int, json_path: Path | None,
) -> int:
    """Run the CUDA benchmark, print the Markdown table, write JSON and ``.md`` beside it when asked."""
    if any(t < 2 for t in lengths):
        raise ValueError(f"lengths must be >= 2, got {lengths}")
    print(f"jrt bench prefill (cuda): B={batch} H={heads} Dh={head_dim} F={feature_dim} lengths={lengths} "
          f"methods={','.join(methods)}", flush=True)
    result = run_cuda_prefill(
        lengths=tuple(lengths), batch=batch, heads=heads, head_dim=head_dim, feature_dim=feature_dim,
        methods=methods, warmup=warmup, repeats=repeats,
    )
    table = markdown_table(result)
    print(table)
    if json_path is not None:
        write_json(json_path, result).with_suffix(".md").write_text(table)
    return 0


def run_from_prefill_args(args: argparse.Namespace, lengths: list[int], methods: tuple[str, ...]) -> int:
    """``jrt bench prefill --device cuda`` (``jrt.bench.prefill`` hands its parsed options over): the CPU
    benchmark's default method list stands for every CUDA method."""
    from jrt.bench.prefill import METHODS

    if tuple(methods) == tuple(METHODS):
        methods = CUDA_METHODS
    return run_and_write(
        lengths, tuple(methods), batch=args.batch, heads=args.heads, head_dim=args.head_dim,
        feature_dim=args.feature_dim, warmup=max(1, args.warmup), repeats=args.repeats, json_path=args.json,
    )


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m jrt.bench.prefill_cuda``), the same as ``jrt bench prefill --device cuda``."""
    parser = argparse.ArgumentParser(prog="python -m jrt.bench.prefill_cuda", description=__doc__.splitlines()[0])
    add_cuda_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_and_write(
            _split(args.lengths, "lengths", int), tuple(_split(args.methods, "methods")), batch=args.batch,
            heads=args.heads, head_dim=args.head_dim, feature_dim=args.feature_dim, warmup=args.warmup,
            repeats=args.repeats, json_path=args.json,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
