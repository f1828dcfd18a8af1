"""``jrt train`` (pretraining, also under torchrun) and ``jrt data prepare`` (tokenization into shards)."""

from __future__ import annotations

import argparse
import json

from jrt.training.config import TRAIN_PRESETS, build_config, parse_overrides


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(TRAIN_PRESETS), help="training preset (model, batch, schedule)")
    parser.add_argument("--data", required=True, help="folder written by `jrt data prepare`")
    parser.add_argument("--output", required=True, help="run folder: checkpoints/, model/, metrics.jsonl")
    parser.add_argument("--config", help="YAML or JSON file of training options (over the preset)")
    parser.add_argument("--max-steps", type=int, help="number of optimizer steps (sets the schedule length)")
    parser.add_argument("--max-minutes", type=float, help="stop (and checkpoint) after this many minutes")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="option overrides, e.g. lr=1e-3 micro_batch_size=4 'model_overrides={swa_window: 32}'")


def run_train(args: argparse.Namespace) -> int:
    from jrt.training.trainer import train

    overrides = parse_overrides(args.overrides)
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    if args.max_minutes is not None:
        overrides["max_minutes"] = args.max_minutes
    if args.preset is None and args.config is None and "model" not in overrides:
        raise ValueError("give --preset, --config or model=NAME")
    cfg = build_config(args.preset, args.config, overrides)
    summary = train(cfg, args.data, args.output, resume=args.resume,
                    device=None if args.device == "auto" else args.device, progress=not args.no_progress)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from jrt.training.prepare import prepare_dataset

    index = prepare_dataset(
        args.input, args.output, args.tokenizer, workers=args.workers, val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens, doc_split=args.doc_split, text_field=args.text_field,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(f"{args.output}: {index['train']['tokens']:,} train tokens in {len(index['train']['shards'])} shard(s) "
          f"({index['train']['documents']:,} documents), {index['val']['tokens']:,} validation tokens "
          f"({index['val']['documents']:,} documents), dtype {index['dtype']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    train_p = subparsers.add_parser(
        "train", help="pretrain JRT-RNN or a baseline (also under torchrun)",
        description="Pretrain JRT-RNN (prefix masked-LM + next-token objective) or a baseline (next-token). "
                    "Run under `torchrun --nproc_per_node N` for data parallelism.",
    )
    add_train_arguments(train_p)
    train_p.set_defaults(func=run_train)

    data_p = subparsers.add_parser("data", help="prepare training data",
                                   description="Prepare pretraining data.")
    data_sub = data_p.add_subparsers(dest="data_command", metavar="ACTION")
    prep = data_sub.add_parser(
        "prepare", help="tokenize text into packed token shards",
        description="Tokenize local text files/globs or a Hugging Face dataset (hf:NAME[:CONFIG][@SPLIT]) into "
                    "memory-mapped uint16/uint32 shards with an index and a validation split.",
    )
    prep.add_argument("--tokenizer", default="gpt2",
                      help="tokenizer folder or name (gpt2: the offline GPT-2 tokenizer of the data folder)")
    prep.add_argument("--input", nargs="+", required=True, help="files, globs, folders or hf:NAME[:CONFIG][@SPLIT]")
    prep.add_argument("--output", required=True, help="output folder")
    prep.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: min(4, CPUs))")
    prep.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation")
    prep.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    prep.add_argument("--doc-split", choices=("file", "paragraph", "line", "jsonl"), default="paragraph",
                      help="what is a document in a text file (.jsonl files are always JSON lines)")
    prep.add_argument("--text-field", default="text", help="text field of JSON lines / dataset rows")
    prep.add_argument("--overwrite", action="store_true", help="replace an output made from other inputs")
    prep.add_argument("--no-progress", action="store_true")
    prep.set_defaults(func=run_prepare)
    data_p.set_defaults(func=lambda args: data_p.print_help() or 0)
