"""The ``jrt`` command line.

Each sub-command lives in its own module, which exposes ``register(subparsers)``: it adds its parser and
sets ``func`` (called with the parsed arguments, returning an exit code). Adding a command means adding
its module path to :data:`COMMAND_MODULES`.

Conventions checked here for every command before it runs (:func:`check_common_arguments`), so that a bad
path fails in a second rather than after the work: an argument named ``output`` or ``out`` is an output
folder, ``json`` an output file, ``threads`` a count >= 1. User errors (``CLIError``, ``ValueError``, file
errors) print one line ``jrt COMMAND: error: ...`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jrt import __version__

#: Modules that contribute sub-commands, in the order they appear in ``jrt --help``.
COMMAND_MODULES: tuple[str, ...] = (
    "jrt.bench.cli",
    "jrt.synthetics.cli",
    "jrt.training.cli",
    "jrt.evaluation.cli",
    "jrt.evaluation.compare",
    "jrt.convert_cli",
    "jrt.linearize.cli",
)


class CLIError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_parent(path: Path, option: str, shown: str) -> None:
    base = _nearest_existing(path.parent if path.parent != path else path)
    if not base.is_dir():
        raise CLIError(f"{option} {shown}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {shown} is not writable ({base}: read-only file system or no permission)")


def check_output_dir(path: str | os.PathLike, option: str = "--output") -> None:
    """``CLIError`` unless ``path`` is (or can be created as) a writable folder; creates nothing."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise CLIError(f"{option} {path} is an existing file, not a folder")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise CLIError(f"{option} {path} is not writable (read-only file system or no permission)")
        return
    _check_writable_parent(p, option, str(path))


def check_output_file(path: str | os.PathLike, option: str = "--json") -> None:
    """``CLIError`` unless ``path`` is (or can be created as) a writable file; creates nothing."""
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise CLIError(f"{option} {path} is a folder, not a file")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise CLIError(f"{option} {path} is not writable (read-only file system or no permission)")
        return
    _check_writable_parent(p, option, str(path))


def check_common_arguments(args: argparse.Namespace) -> None:
    """The conventions of the module docstring: output folders / file writable, ``--threads`` >= 1."""
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise CLIError(f"--threads must be >= 1, got {threads}")
    for name in ("output", "out"):
        value = getattr(args, name, None)
        if value is not None:
            positional = getattr(args, "command", None) == "convert"
            check_output_dir(value, name.upper() if positional else f"--{name}")
    if getattr(args, "json", None) is not None:
        check_output_file(args.json, "--json")


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
    previous = _sigterm_interrupts()
    try:
        check_common_arguments(args)
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as err:
        print(f"jrt {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a write that failed anyway (disk full, permissions changed during the run)
        where = f": {err.filename}" if err.filename else ""
        print(f"jrt {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _sigterm_interrupts() -> Any:
    """SIGTERM stops a command as Ctrl-C does (worker pools stopped, finished work kept); returns the previous
    handler, or None where no handler can be installed (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split("\n")).strip()
    return text or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
