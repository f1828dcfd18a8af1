"""Evaluation of JRT-Prompt on any causal LM: engine, results, summaries, lm-evaluation-harness adapter."""

from __future__ import annotations

from pathlib import Path

from jrt.evaluation.engine import MAX_NEW_TOKENS, Prepared, generate, prepare, stop_token_ids
from jrt.evaluation.runner import EvalConfig, evaluate, format_table, read_results, summarize, write_summary


def lm_eval_tasks_dir() -> str:
    """Folder of the lm-evaluation-harness task definitions (``jrt_fda``, ``jrt_fda_twice``, ...).

    Use it as ``lm_eval.tasks.TaskManager(include_path=jrt.evaluation.lm_eval_tasks_dir())``.
    """
    return str(Path(__file__).with_name("lm_eval_tasks"))


__all__ = [
    "MAX_NEW_TOKENS",
    "EvalConfig",
    "Prepared",
    "evaluate",
    "format_table",
    "generate",
    "lm_eval_tasks_dir",
    "prepare",
    "read_results",
    "stop_token_ids",
    "summarize",
    "write_summary",
]
