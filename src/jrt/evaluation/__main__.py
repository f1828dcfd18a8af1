"""``python -m jrt.evaluation ARGS`` = ``jrt eval ARGS``; the form ``torchrun`` launches:
``torchrun --nproc_per_node N -m jrt.evaluation --model ... --output DIR``."""

import sys

from jrt.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
