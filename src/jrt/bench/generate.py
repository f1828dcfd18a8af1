"""``jrt bench generate``: examples/s of the evaluation engine's batched greedy generation against batch size 1.

The same prepared prompts (one task, one prompting mode, the first ``--limit`` examples, sorted by length as
``jrt eval`` sorts them) are generated with each batch size and dtype in turn, in one process, with the settings
of ``jrt eval`` (greedy, stop at the first newline, at most 48 new tokens). A row reports the generation time
(model loading and prompt preparation excluded), examples/s, the speed-up over batch size 1 of the same dtype,
the ``contains`` score, and how many generations equal those of batch size 1 of the same dtype.

Batches larger than one decode in rounds of ``--round-tokens`` new tokens and drop their finished rows in
between (see :func:`jrt.evaluation.engine.generate`); ``--round-tokens 0`` turns that off, to measure what it
buys.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from jrt.bench import write_json

DEFAULT_BATCH_SIZES = (1, 16, 32)
DEFAULT_DTYPES = ("float32", "bfloat16")


def measure(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    golds: list[list[str]],
    batch_size: int,
    round_tokens: int | None,
    max_new_tokens: int,
) -> tuple[float, list[str], float]:
    """``(seconds, generations, contains %)`` of generating ``prompts`` in batches of ``batch_size``."""
    from tqdm.auto import tqdm

    from jrt.evaluation.engine import generate
    from jrt.tasks.metrics import contains

    outputs: list[str] = []
    start = time.perf_counter()
    for i in tqdm(range(0, len(prompts), batch_size), desc=f"batch {batch_size}", leave=False):
        outputs += generate(model, tokenizer, prompts[i : i + batch_size], max_new_tokens, round_tokens=round_tokens)
    seconds = time.perf_counter() - start
    score = 100.0 * sum(contains(o, g) for o, g in zip(outputs, golds)) / len(prompts)
    return seconds, outputs, score


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The printed table."""
    head = (f"{'dtype':9} {'batch':>5} {'rounds':>6} {'seconds':>8} {'examples/s':>10} {'speed-up':>8} "
            f"{'contains':>8} {'same as bs1':>11}")
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['dtype']:9} {r['batch_size']:>5} {r['round_tokens'] or '-':>6} {r['seconds']:>8.1f} "
            f"{r['examples_per_second']:>10.3f} {r['speedup']:>7.2f}x {r['contains']:>8.1f} "
            f"{r['same_as_batch1']:>6}/{r['n']}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from jrt.bench.prefill import _cpu_name
    from jrt.evaluation.engine import prepare
    from jrt.models.loading import (
        load_model,
        load_tokenizer,
        model_max_length,
        offline_gpt2_tokenizer,
        resolve_model_source,
    )
    from jrt.paths import data_path
    from jrt.prompting.templates import mode_repeats
    from jrt.tasks.registry import load_task

    if args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if not args.batch_sizes or any(b < 1 for b in args.batch_sizes):
        raise ValueError("batch sizes must be >= 1")
    if args.round_tokens < 0:
        raise ValueError("--round-tokens must be >= 0")
    mode_repeats(args.mode)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    data_dir = args.data_dir
    if data_dir is None and data_path("recall").is_dir():
        data_dir = str(data_path("recall"))
    data = load_task(args.task, data_dir, args.limit)
    if not data.examples:
        raise ValueError(f"task {args.task}: no examples in {data.source}")
    sizes = sorted(set(args.batch_sizes) | {1})
    source, gguf = resolve_model_source(args.model, args.gguf_file)
    tokenizer = load_tokenizer(source, gguf)
    trunc = offline_gpt2_tokenizer()
    rounds = args.round_tokens or None
    rows: list[dict[str, Any]] = []
    for dtype in args.dtypes:
        model = load_model(source, gguf, args.device, dtype)
        prepared = [prepare(data.spec, ex, args.mode, tokenizer, trunc, model_max_length(model))
                    for ex in data.examples]
        prepared.sort(key=lambda p: -p.prompt_tokens)
        prompts = [p.prompt for p in prepared]
        golds = [p.example.answers for p in prepared]
        measure(model, tokenizer, prompts[:2], golds[:2], 2, rounds, 4)  # warm-up
        reference: list[str] = []
        base = 0.0
        for size in sizes:
            seconds, outputs, score = measure(model, tokenizer, prompts, golds, size, rounds, args.max_new_tokens)
            if size == 1:
                reference, base = outputs, seconds
            rows.append({
                "dtype": dtype, "batch_size": size, "round_tokens": rounds if size > 1 else None,
                "n": len(prompts), "seconds": round(seconds, 3),
                "examples_per_second": round(len(prompts) / seconds, 4), "speedup": round(base / seconds, 3),
                "contains": round(score, 2), "same_as_batch1": sum(a == b for a, b in zip(outputs, reference)),
            })
            print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
        del model
    print()
    print(format_rows(rows))
    if args.json:
        payload = {
            "rows": rows,
            "config": {"model": args.model, "task": args.task, "mode": args.mode, "limit": args.limit,
                       "mean_prompt_tokens": round(sum(p.prompt_tokens for p in prepared) / len(prepared), 1),
                       "max_new_tokens": args.max_new_tokens, "device": args.device,
                       "threads": torch.get_num_threads(), "cpu": _cpu_name(), "torch": torch.__version__},
        }
        write_json(args.json, payload)
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    parser = bench_subparsers.add_parser(
        "generate",
        help="examples/s of jrt eval's batched generation against batch size 1 (default: SmolLM2, 64 SQuAD)",
        description="Examples/s of the evaluation engine's batched greedy generation at several batch sizes and "
        "dtypes against batch size 1, on the same prompts, with the contains score of each run.",
    )
    parser.add_argument("--model", default="smollm2-135m", help="model id, folder or alias (default: %(default)s)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    parser.add_argument("--task", default="squad", help="recall task (default: %(default)s)")
    parser.add_argument("--mode", default="default", help="prompting mode (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=64, help="examples (default: %(default)s)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with <task>.jsonl (default: offline recall stand-ins if present, else the Hub)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES), metavar="B",
                        help="batch sizes; 1 is always run as the baseline (default: 1 16 32)")
    parser.add_argument("--dtypes", nargs="+", default=list(DEFAULT_DTYPES), metavar="DTYPE",
                        help="model dtypes (default: float32 bfloat16)")
    parser.add_argument("--round-tokens", type=int, default=8,
                        help="new tokens between two removals of finished rows; 0 = one generate call per batch")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", metavar="F", help="write {'rows': [...], 'config': {...}} to this file")
    parser.set_defaults(func=run)
