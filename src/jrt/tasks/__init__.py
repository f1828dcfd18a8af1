"""Recall tasks (FDA, SWDE, SQuAD, NQ, TriviaQA, DROP): loading, truncation and metrics."""

from jrt.tasks.metrics import contains, exact_match, normalize_answer, token_f1
from jrt.tasks.registry import (
    TASKS,
    Example,
    TaskData,
    TaskSpec,
    get_task,
    iter_local_records,
    load_task,
    local_file,
    parse_tasks,
    standin_cloze,
)
from jrt.tasks.truncation import Truncated, find_answer, truncate_context

__all__ = [
    "TASKS",
    "Example",
    "TaskData",
    "TaskSpec",
    "Truncated",
    "contains",
    "exact_match",
    "find_answer",
    "get_task",
    "iter_local_records",
    "load_task",
    "local_file",
    "normalize_answer",
    "parse_tasks",
    "standin_cloze",
    "token_f1",
    "truncate_context",
]
