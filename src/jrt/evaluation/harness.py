"""``python -m jrt.evaluation.harness ...``: lm-eval's command line with the ``jrt`` model and ``jrt_*`` tasks.

It registers the ``jrt`` model (:mod:`jrt.evaluation.lm_eval_model`), adds ``--include_path`` pointing at
:func:`jrt.evaluation.lm_eval_tasks_dir` unless one is given, and hands over to lm-eval's own CLI.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI with the project's model and tasks registered."""
    import jrt.evaluation.lm_eval_model  # noqa: F401  (registers the "jrt" model)
    from jrt.evaluation import lm_eval_tasks_dir

    args = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in args:
        args += ["--include_path", lm_eval_tasks_dir()]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
