"""``jrt bench``: the benchmark group. Each benchmark module exposes ``add_parser(bench_subparsers)``."""

from __future__ import annotations

import argparse
import importlib

#: Modules that contribute ``jrt bench`` sub-commands.
BENCHMARK_MODULES: tuple[str, ...] = (
    "jrt.bench.prefill",
    "jrt.bench.decode",
    "jrt.bench.generate",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="throughput and memory benchmarks",
        description="Throughput and memory benchmarks; each prints a table and can write JSON.",
    )
    bench = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name in BENCHMARK_MODULES:
        importlib.import_module(name).add_parser(bench)
    parser.set_defaults(func=lambda args: parser.print_help() or 0)
