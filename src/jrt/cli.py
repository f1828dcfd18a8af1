"""The ``jrt`` command line.

Each sub-command lives in its own module, which exposes ``register(subparsers)``: it adds its parser and
sets ``func`` (called with the parsed arguments, returning an exit code). Adding a command means adding
its module path to :data:`COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from jrt import __version__

#: Modules that contribute sub-commands, in the order they appear in ``jrt --help``.
COMMAND_MODULES: tuple[str, ...] = (
    "jrt.bench.cli",
    "jrt.synthetics.cli",
    "jrt.training.cli",
    "jrt.evaluation.cli",
    "jrt.convert_cli",
    "jrt.linearize.cli",
)


class CLIError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jrt",
        description="just-read-twice: JRT-Prompt, JRT-RNN and fast linear attention for recurrent LMs.",
    )
    parser.add_argument("--version", action="version", version=f"jrt {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as err:
        print(f"jrt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
