"""The CUDA part of ``jrt bench prefill --device cuda``: prefill throughput on a GPU against FlashAttention-2.

The methods are those of the ``kernels`` backend of :mod:`jrt.bench.prefill_methods` (``sdpa`` on the flash
backend, ``jrt_prompt``, ``jrt_rnn`` and ``based`` on the Triton kernels, flash-linear-attention's Based kernels
when ``fla`` is installed), in bfloat16, batch ``B``, ``H`` heads of head dim 64 (``F = 16``), each timed with
CUDA events (median of ``repeats`` after ``warmup`` runs).

Per row: median milliseconds, tokens per second (``B * T`` prompt tokens; JRT-Prompt reads ``T`` prompt
tokens twice), the speed-up ``sdpa / method`` at the same ``T``, the achieved model FLOP rate next to the
device's measured bfloat16 matrix-product ceiling (:func:`jrt.bench.prefill_methods.kernel_flops`), and the
minimum memory traffic rate next to the measured device copy rate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from jrt.bench import write_json
from jrt.bench.prefill_methods import Shape, build, fla_based_ops, methods_of, sdpa_flops, time_cuda

#: Methods measured on CUDA, in table order.
CUDA_METHODS = methods_of("kernels")
DEFAULT_LENGTHS = (2048, 4096, 8192, 16384, 32768)

__all__ = ["CUDA_METHODS", "DEFAULT_LENGTHS", "device_ceilings", "markdown_table", "run_and_write",
           "run_cuda_prefill", "sdpa_flops"]


def cuda_time_ms(fn, warmup: int = 2, repeats: int = 5, device: torch.device | str = "cuda") -> float:
    """Median wall time of ``fn()`` on the current CUDA stream, in milliseconds (CUDA events)."""
    return time_cuda(fn, torch.device(device), repeats, warmup)[0] * 1e3


def device_ceilings(device: torch.device, size: int = 8192) -> dict[str, float]:
    """Measured ceilings: bfloat16 matrix-product TFLOP/s (``size^3``) and device-to-device copy GB/s."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    ms = cuda_time_ms(lambda: a @ b, warmup=3, repeats=10, device=device)
    x = torch.empty(2**30 // 2, device=device, dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    copy_ms = cuda_time_ms(lambda: y.copy_(x), warmup=3, repeats=10, device=device)
    return {
        "matmul_bf16_tflops": 2 * size**3 / ms / 1e9,
        "copy_gbps": 2 * x.numel() * x.element_size() / copy_ms / 1e6,
    }


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
    backward: bool = False,
) -> dict:
    """Time every available method at every length. Returns ``{"device", "ceilings", "rows"}``; each row has
    ``method, T, batch, heads, ms, tokens_per_s, tflops, gbps, speedup_vs_sdpa`` (``None`` when not measured),
    and ``autotuned``: the launch configuration the autotuner chose for each Triton kernel. ``backward``: time
    forward + backward (FlashAttention-2's backward for ``sdpa``) instead of the forward."""
    if not torch.cuda.is_available():
        raise ValueError("the CUDA prefill benchmark needs a CUDA device (torch.cuda.is_available() is False)")
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"run_cuda_prefill needs a CUDA device, got {device}")
    fla = fla_based_ops()
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
                shape = Shape(batch, heads, t, feature_dim, head_dim, device, torch.bfloat16, backward=backward)
                case = build(method, "kernels", shape)
                ms = cuda_time_ms(case.run, warmup=warmup, repeats=repeats, device=device)
                row.update(ms=ms, tokens_per_s=case.tokens / ms * 1e3, tflops=case.flops / ms / 1e9,
                           gbps=case.nbytes / ms / 1e6)
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
                   "dtype": "bfloat16", "warmup": warmup, "repeats": repeats, "backward": backward},
        "autotuned": _autotuned(),
        "rows": rows,
    }


def _autotuned() -> dict[str, str]:
    """The configurations the autotuner picked (last key tuned), for the record."""
    from jrt.ops.triton import autotuned_configs

    return autotuned_configs()


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(result: dict) -> str:
    """The result as a Markdown section body: ceilings, then one table row per (T, method)."""
    c = result["ceilings"]
    mode = "forward + backward" if result["config"].get("backward") else "forward"
    lines = [
        f"Device: {result['device']} (torch {result['torch']}), {mode}; measured ceilings: bf16 matmul "
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
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead of the forward")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the result as JSON here (and the Markdown table beside it, .md)")


def _split(text: str, name: str, cast=str) -> list:
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be a comma-separated list, got {text!r}") from None


def run_and_write(
    lengths: list[int], methods: tuple[str, ...], *, batch: int, heads: int, head_dim: int, feature_dim: int,
    warmup: int, repeats: int, json_path: Path | None, backward: bool = False,
) -> int:
    """Run the CUDA benchmark, print the Markdown table, write JSON and ``.md`` beside it when asked."""
    if any(t < 2 for t in lengths):
        raise ValueError(f"lengths must be >= 2, got {lengths}")
    print(f"jrt bench prefill (cuda): B={batch} H={heads} Dh={head_dim} F={feature_dim} lengths={lengths} "
          f"methods={','.join(methods)}{' forward+backward' if backward else ''}", flush=True)
    result = run_cuda_prefill(
        lengths=tuple(lengths), batch=batch, heads=heads, head_dim=head_dim, feature_dim=feature_dim,
        methods=methods, warmup=warmup, repeats=repeats, backward=backward,
    )
    table = markdown_table(result)
    print(table)
    if json_path is not None:
        write_json(json_path, result).with_suffix(".md").write_text(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m jrt.bench.prefill_cuda``), the same as ``jrt bench prefill --device cuda``."""
    parser = argparse.ArgumentParser(prog="python -m jrt.bench.prefill_cuda", description=__doc__.splitlines()[0])
    add_cuda_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_and_write(
            _split(args.lengths, "lengths", int), tuple(_split(args.methods, "methods")), batch=args.batch,
            heads=args.heads, head_dim=args.head_dim, feature_dim=args.feature_dim, warmup=args.warmup,
            repeats=args.repeats, json_path=args.json, backward=args.backward,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
