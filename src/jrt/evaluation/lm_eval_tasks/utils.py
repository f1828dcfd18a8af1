"""Helpers of the ``jrt_*`` lm-evaluation-harness tasks (loaded by the YAML files beside this one).

Each task's ``metadata`` names the project task and mode (``jrt_task``, ``jrt_mode``); the dataset is built
by :func:`load_jrt_dataset` with the project's own loader, truncation and templates, so lm-eval sees exactly
the prompts that ``jrt eval`` sends. Data: local files when ``data_dir`` is given (``--metadata
'{"data_dir": "DIR"}'`` on the lm-eval command line, ``TaskManager(metadata={"data_dir": ...})``, or the
``JRT_EVAL_DATA_DIR`` environment variable), else the authors' Hugging Face datasets.
"""

from __future__ import annotations

import os
from typing import Any

from jrt.evaluation.engine import prepare
from jrt.models.loading import offline_gpt2_tokenizer
from jrt.tasks.metrics import contains
from jrt.tasks.registry import get_task, load_task

DATA_DIR_ENV = "JRT_EVAL_DATA_DIR"


def load_jrt_dataset(jrt_task: str, jrt_mode: str = "default", data_dir: str | None = None,
                     limit: int | None = None, **_: Any) -> Any:
    """A ``datasets.DatasetDict`` with a ``test`` split of ``{"id", "prompt", "answers"}`` rows.

    Prompts are rendered by :func:`jrt.evaluation.engine.prepare` with the GPT-2 truncation tokenizer and no
    model length limit (lm-eval left-truncates to the model itself).
    """
    import datasets

    spec = get_task(jrt_task)
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
    data = load_task(spec, data_dir, limit)
    tok = offline_gpt2_tokenizer()
    rows = []
    for ex in data.examples:
        p = prepare(spec, ex, jrt_mode, tok, tok, max_length=None)
        rows.append({"id": ex.id, "prompt": p.prompt, "answers": list(ex.answers)})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``contains`` of the generation (the same function ``jrt eval`` uses)."""
    return {"contains": float(contains(results[0], doc["answers"]))}
