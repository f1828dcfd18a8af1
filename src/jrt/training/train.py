"""Entry point for torchrun: ``torchrun --nproc_per_node 8 -m jrt.training.train --preset jrt-360m ...``
(the same options as ``jrt train``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jrt.training.cli import add_train_arguments, run_train


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jrt.training.train", description=__doc__)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    from jrt.cli import CLIError, check_common_arguments

    try:
        check_common_arguments(args)
        return run_train(args)
    except (CLIError, ValueError, OSError) as err:
        print(f"jrt train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
