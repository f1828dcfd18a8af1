"""``jrt linearize``: linearize a Llama-family teacher (train), rebuild a student from a delta (apply), save the
teacher's tokenizer for ``jrt data prepare`` (tokenizer), or measure the held-out perplexity of the teacher and
students on the same validation windows (perplexity)."""

from __future__ import annotations

import argparse
import json

ACTIONS = ("train", "apply", "tokenizer", "perplexity")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.action == "tokenizer":
        from jrt.linearize.train import load_teacher_tokenizer

        tokenizer = load_teacher_tokenizer(args.teacher, args.gguf_file)
        tokenizer.save_pretrained(args.output)
        print(f"{args.output}: tokenizer of {args.teacher} ({len(tokenizer)} tokens)")
        return 0
    if args.action == "apply":
        from jrt.linearize.train import apply_delta, load_teacher
        from jrt.training.checkpoint import save_pretrained_atomic

        if args.delta is None:
            raise ValueError("apply needs --delta FILE")
        teacher, tokenizer = load_teacher(args.teacher, args.gguf_file)
        student = apply_delta(teacher, args.delta)
        save_pretrained_atomic(student, _output_path(args.output))
        tokenizer.save_pretrained(args.output)
        print(f"{args.output}: {student.config.mode} student of {args.teacher}, state "
              f"{student.state_size_bytes(1):,} bytes per sequence")
        return 0
    if args.action == "perplexity":
        return _perplexity(args)
    from jrt.linearize.train import LinearizeConfig, Linearizer

    if args.data is None:
        raise ValueError("give --data DIR (a `jrt data prepare` folder tokenized with the teacher's tokenizer)")
    cfg = LinearizeConfig(
        teacher=args.teacher, gguf_file=args.gguf_file, mode=args.mode, feature_dim=args.feature_dim,
        window=args.window, seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens,
        max_minutes=args.max_minutes, lr_transfer=args.lr_transfer, lr_finetune=args.lr_finetune,
        lora_rank=args.lora_rank, mask_token_id=args.mask_token_id, save_every=args.save_every,
    )
    cfg.validate()  # before loading anything
    summary = Linearizer(cfg, args.data, _output_path(args.output), resume=args.resume,
                         progress=not args.no_progress).run()
    print(json.dumps(summary))
    return 0


def _perplexity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from jrt.linearize.train import held_out_perplexity, load_teacher

    if args.data is None:
        raise ValueError("perplexity needs --data DIR (a `jrt data prepare` folder tokenized with the teacher's "
                         "tokenizer)")
    if args.windows is not None and args.windows < 1:
        raise ValueError(f"--windows must be >= 1, got {args.windows}")
    teacher, _ = load_teacher(args.teacher, args.gguf_file)
    models = {"teacher": teacher}
    for spec in args.student or []:
        name, sep, folder = spec.partition("=")
        name, folder = (name, folder) if sep else (Path(spec).name, spec)
        if not Path(folder).is_dir():
            raise ValueError(f"student folder not found: {folder}")
        models[name] = AutoModelForCausalLM.from_pretrained(folder)
    result = held_out_perplexity(models, args.data, args.seq_len, args.windows, progress=not args.no_progress)
    for name, r in result.items():
        print(f"{name:>12}: perplexity {r['ppl']:.2f} [95% CI {r['ci'][0]:.2f}, {r['ci'][1]:.2f}] over "
              f"{r['windows']} windows ({r['tokens']} predicted tokens{', prefix read' if r['prefix'] else ''})")
    out = Path(_output_path(args.output))
    out.mkdir(parents=True, exist_ok=True)
    (out / "perplexity.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _output_path(path: str) -> str:
    from pathlib import Path

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--output {path} exists and is not a folder")
    return path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "linearize", help="turn a Llama-family Transformer into a recurrent (Based / JRT-RNN) student",
        description="train (default): attention transfer then LoRA fine-tuning of a linearized student; "
                    "apply: rebuild a student from --delta; tokenizer: save the teacher's tokenizer to --output "
                    "(for `jrt data prepare --tokenizer`).",
    )
    p.add_argument("action", nargs="?", choices=ACTIONS, default="train")
    p.add_argument("--teacher", required=True, help="Hub id, folder or smollm2-135m (offline GGUF)")
    p.add_argument("--gguf-file", help="GGUF file inside the --teacher folder")
    p.add_argument("--data", help="folder written by `jrt data prepare` with the teacher's tokenizer")
    p.add_argument("--output", required=True, help="run folder (train), model folder (apply) or tokenizer folder")
    p.add_argument("--delta", help="apply: the delta.safetensors of a run")
    p.add_argument("--student", action="append", metavar="[NAME=]FOLDER",
                   help="perplexity: a student model folder (repeat for several); the teacher is always measured")
    p.add_argument("--windows", type=int, default=None,
                   help="perplexity: the first N validation windows of --seq-len + 1 tokens (default: all)")
    p.add_argument("--mode", choices=("based", "jrt"), default="based")
    p.add_argument("--feature-dim", type=int, default=16, help="F of the learned feature projection (16)")
    p.add_argument("--window", type=int, default=64, help="softmax sliding window mixed in (0: none; 64)")
    p.add_argument("--seq-len", type=int, default=512, help="training context (512)")
    p.add_argument("--batch-size", type=int, default=4)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-minutes", type=float, help="wall-time budget (half transfer, half fine-tuning)")
    budget.add_argument("--max-tokens", type=int, help="token budget (half transfer, half fine-tuning)")
    p.add_argument("--lr-transfer", type=float, default=1e-2)
    p.add_argument("--lr-finetune", type=float, default=5e-4)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--mask-token-id", type=int, help="jrt mode: masked-LM input id (default: a spare special token)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
