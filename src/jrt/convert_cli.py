"""``jrt convert``: checkpoint conversion (``jrt convert official SRC OUT``).

Kept outside :mod:`jrt.models` so that building the command line does not import ``transformers``.
"""

from __future__ import annotations

import argparse

DTYPES = ("float32", "bfloat16", "float16")


def _convert_official(args: argparse.Namespace) -> int:
    import torch

    from jrt.models.convert import convert_official

    model = convert_official(args.source, args.out, dtype=getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"converted {args.source} -> {args.out}: {model.config.num_hidden_layers} layers, "
        f"d={model.config.hidden_size}, {n_params:,} parameters ({args.dtype}, safetensors)"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert published checkpoints to Hugging Face folders",
        description="Convert published checkpoints into save_pretrained folders loadable with "
        "AutoModelForCausalLM after `import jrt`.",
    )
    kinds = parser.add_subparsers(dest="kind", metavar="KIND")
    official = kinds.add_parser(
        "official",
        help="the authors' JRT-RNN checkpoint (hazyresearch/JRT-360M-30B, JRT-1B-50B)",
        description="Read config.json and pytorch_model.bin/safetensors from SRC (a folder or Hub id; keys may "
        "carry a `model.` prefix and metric scalars) and write a save_pretrained folder OUT.",
    )
    official.add_argument("source", metavar="SRC", help="checkpoint folder or Hugging Face Hub id")
    official.add_argument("out", metavar="OUT", help="output folder (created)")
    official.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype to save (float32)")
    official.set_defaults(func=_convert_official)
    parser.set_defaults(func=lambda args: parser.print_help() or 0)
