"""``jrt bench prefill``: prefill throughput of JRT-Prompt and JRT-RNN against softmax attention.

At each length T (as in the paper's operator benchmark: F = 16, head dim = Dv = 64):

- ``sdpa``: causal ``scaled_dot_product_attention`` over T tokens (FlashAttention-2 on a GPU);
- ``jrt_prompt``: causal :func:`jrt.ops.linear_attention` over 2T tokens (the prompt read twice);
- ``jrt_rnn``: :func:`jrt.ops.prefix_linear_attention` over T tokens of which the first T/2 are the prefix.

``--backward`` times forward + backward (a gradient of ones on the output) of every method instead of the
forward alone: SDPA's backward against the linear-time forms'. A method written ``METHOD@IMPL`` (e.g.
``jrt_prompt@chunk``) runs with its own ``jrt.ops`` implementation, so that two implementations are compared side
by side in one run.

The methods, FLOP models and timers are those of :mod:`jrt.bench.prefill_methods` (its ``ops`` backend);
``--device cuda`` with ``--impl auto`` or ``triton`` runs its ``kernels`` backend instead
(:mod:`jrt.bench.prefill_cuda`). Times are medians of several runs after a warm-up, measured side by side in one
process; the table gives the ratios ``sdpa / jrt_*``, each method's achieved GFLOP/s and its fraction of the
matrix-multiply rate measured in the same run (a ``2048 x 2048`` product in the benchmark's dtype, the best of a
measurement before and one after the methods). Peak memory is the CUDA allocator's peak on a GPU and the growth
of the resident set (sampled) on a CPU.

FLOP model (only products count; :mod:`jrt.bench.prefill_methods` has the derivation), per (sequence, head),
with ``Dc = 1+F+F(F+1)/2`` the compressed feature dimension and ``C = 64``:

- ``sdpa``: ``2 * T^2 * Dh`` (``Q K^T`` and ``P V`` over the causal triangle);
- ``jrt_prompt``: the minimal count of the chunked algorithm over ``2T`` tokens, ``4 * Dc * (Dv+1)`` per token
  (state update and read) plus ``(C+1) * (F + Dv+1)`` per token (the intra-chunk products over each chunk's
  lower triangle): 45,045 FLOPs per token at F = 16, Dv = 64;
- ``jrt_rnn``: the same over ``T`` tokens plus ``2 * Dc * (Dv+1)`` per prefix token (the encoder state);
- forward + backward: 3x the forward for linear attention (each product has two products of its size in the
  backward pass), 3.5x for softmax attention (FlashAttention-2 recomputes ``Q K^T`` in its backward).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from jrt.bench import write_json
from jrt.bench.prefill_methods import (
    Shape,
    build,
    linear_attention_flops,
    prefix_flops,
    sdpa_flops,
    time_call,
)
from jrt.ops.common import split_impl

#: The methods of the ``ops`` backend (any device, through :mod:`jrt.ops`), in table order.
METHODS = ("sdpa", "jrt_prompt", "jrt_rnn", "jrt_prompt_products")
#: The methods timed unless ``--methods`` says otherwise.
DEFAULT_METHODS = ("sdpa", "jrt_prompt", "jrt_rnn")


@dataclass
class Row:
    method: str
    length: int
    batch: int
    heads: int
    seconds: float
    peak_mem_bytes: int | None
    gflops: float


def matmul_gflops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """The device's matrix-multiply rate in this run: a ``size x size`` product, median of ``repeats``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds, _ = time_call(lambda: a @ b, device, repeats, warmup=2)
    return 2.0 * size**3 / seconds / 1e9


# ------------------------------------------------------------------------------------------------ the benchmark


def run_prefill(
    lengths: list[int],
    *,
    device: str = "cpu",
    batch: int = 1,
    heads: int = 16,
    head_dim: int = 64,
    feature: int = 16,
    dtype: str | None = None,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    repeats: int = 3,
    warmup: int = 1,
    impl: str = "auto",
    backward: bool = False,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """Time every method at every length (forward, or forward + backward with ``backward``); returns
    ``{"rows": [...], "machine": {...}, "config": {...}}``; each row has its ``fraction_of_matmul``."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    unknown = [m for m in methods if split_impl(m)[0] not in METHODS]  # (also checks each @IMPL)
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose among {', '.join(METHODS)} "
                         "(each optionally with @IMPL, e.g. jrt_prompt@chunk)")
    if any(t < 2 for t in lengths):
        raise ValueError(f"lengths must be >= 2, got {lengths}")
    torch_dtype = _parse_dtype(dtype, dev)
    matmul_before = matmul_gflops(dev, torch_dtype)
    rows: list[Row] = []
    for t in lengths:
        for method in methods:
            base, own_impl = split_impl(method)
            shape = Shape(batch, heads, t, feature, head_dim, dev, torch_dtype, own_impl or impl, backward=backward)
            case = build(base, "ops", shape)
            seconds, peak = time_call(case.run, dev, repeats, warmup)
            rows.append(Row(method, t, batch, heads, seconds, peak, case.flops / seconds / 1e9))
            if progress:
                progress(f"  {method:<18} T={t:<6} {seconds * 1e3:10.1f} ms")
            del case
    machine = _machine(dev, torch_dtype)
    machine["matmul_gflops"] = max(matmul_before, matmul_gflops(dev, torch_dtype))
    out = [asdict(r) | {"fraction_of_matmul": r.gflops / machine["matmul_gflops"]} for r in rows]
    return {"rows": out, "machine": machine,
            "config": {"head_dim": head_dim, "feature_dim": feature, "dtype": str(torch_dtype), "impl": impl,
                       "repeats": repeats, "warmup": warmup, "backward": backward}}


def _parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose among {', '.join(table)}")
    return table[name]


def _machine(device: torch.device, dtype: torch.dtype) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(dtype)}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        info["name"] = _cpu_name()
        info["cores"] = os.cpu_count()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def format_table(result: dict) -> str:
    """The printed table: time, GFLOP/s, percent of the matrix-multiply rate, peak memory and the sdpa / jrt
    ratios per length."""
    rows = result["rows"]
    by = {(r["method"], r["length"]): r for r in rows}
    seen = list(dict.fromkeys(r["method"] for r in rows))
    methods = sorted(seen, key=lambda m: (METHODS.index(split_impl(m)[0]), seen.index(m)))
    lengths = sorted({r["length"] for r in rows})
    mm = result["machine"]["matmul_gflops"]
    width = {m: max(14, len(m) + 4) for m in methods}  # time column
    ratio_names = [m for m in methods if split_impl(m)[0] not in ("sdpa", "jrt_prompt_products")]
    ratio_names = ratio_names if "sdpa" in methods else []
    ratio_width = {m: max(16, len(m) + 7) for m in ratio_names}
    head = f"{'T':>7} " + "".join(f"{m + ' ms':>{width[m]}}{'GFLOP/s':>9}{'% mm':>6}{'peak MB':>9}" for m in methods)
    head += "".join(f"{'sdpa/' + m:>{ratio_width[m]}}" for m in ratio_names)
    lines = [head, "-" * len(head)]
    for t in lengths:
        line = f"{t:>7} "
        for m in methods:
            r = by.get((m, t))
            if r is None:
                line += f"{'-':>{width[m]}}{'-':>9}{'-':>6}{'-':>9}"
                continue
            mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.0f}"
            line += f"{r['seconds'] * 1e3:>{width[m]}.1f}{r['gflops']:>9.1f}{100 * r['gflops'] / mm:>6.1f}{mem:>9}"
        for m in ratio_names:
            if (m, t) in by and ("sdpa", t) in by:
                line += f"{by[('sdpa', t)]['seconds'] / by[(m, t)]['seconds']:>{ratio_width[m] - 1}.1f}x"
        lines.append(line)
    machine = result["machine"]
    mode = "forward + backward" if result.get("config", {}).get("backward") else "forward"
    lines.append(f"{mode}; % mm = GFLOP/s over the matrix multiply in this run: {mm:.1f} GFLOP/s "
                 f"({machine['dtype']}, {machine['name']}, {machine['threads']} threads)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI


def add_parser(bench: argparse._SubParsersAction) -> None:
    parser = bench.add_parser(
        "prefill",
        help="prefill throughput: JRT-Prompt and JRT-RNN against softmax attention",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--lengths", default="1024,4096,16384,32768",
                        help="comma-separated sequence lengths T (default: 1024,4096,16384,32768)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64, help="head dim of sdpa and value dim Dv (default 64)")
    parser.add_argument("--feature-dim", type=int, default=16, help="query/key feature dim F (default 16)")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"subset of {','.join(METHODS)}, each optionally as METHOD@IMPL to time one jrt.ops "
                        "implementation beside another in one run, e.g. jrt_prompt,jrt_prompt@chunk (default: "
                        "%(default)s; jrt_prompt_products times only the chunked form's batched products)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--impl", default="auto", help="jrt.ops implementation (auto, native, chunk, triton...)")
    parser.add_argument("--backward", action="store_true",
                        help="time forward + backward (a gradient of ones on the output) instead of the forward")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lengths must be comma-separated integers, got {args.lengths!r}") from None
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    for name in ("batch", "heads", "head_dim", "feature_dim", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.device.startswith("cuda") and args.impl in ("auto", "triton"):
        # the GPU benchmark: the kernels backend (Triton, sdpa on the flash backend, flash-linear-attention);
        # the default method list stands for every kernels method
        from jrt.bench.prefill_cuda import CUDA_METHODS, run_and_write

        return run_and_write(
            lengths, CUDA_METHODS if methods == DEFAULT_METHODS else methods, batch=args.batch, heads=args.heads,
            head_dim=args.head_dim, feature_dim=args.feature_dim, warmup=max(1, args.warmup), repeats=args.repeats,
            json_path=args.json, backward=args.backward,
        )
    print(f"jrt bench prefill: device={args.device} B={args.batch} H={args.heads} Dh={args.head_dim} "
          f"F={args.feature_dim} lengths={lengths}{' forward+backward' if args.backward else ''}", flush=True)
    result = run_prefill(lengths, device=args.device, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                         feature=args.feature_dim, dtype=args.dtype, methods=methods, repeats=args.repeats,
                         warmup=args.warmup, impl=args.impl, backward=args.backward,
                         progress=lambda s: print(s, flush=True))
    print(format_table(result))
    if args.json is not None:
        write_json(args.json, result)
    return 0


__all__ = ["METHODS", "format_table", "linear_attention_flops", "matmul_gflops", "prefix_flops", "run_prefill",
           "sdpa_flops"]
