"""Where the project finds offline data (tokenizers, recall-task stand-ins, corpora).

``JRT_DATA_DIR`` points at a folder laid out like the project's shared data folder (``tokenizers/gpt2``,
``recall/*.jsonl``, ``corpora/*.txt``, ``official/*.tsv``). Without it, ``../shared/data`` relative to the
current directory is used, which is where it lies beside a checkout in CI.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "JRT_DATA_DIR"
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"


def data_dir() -> Path:
    """The offline data folder (it may not exist: callers check and skip or explain)."""
    return Path(os.environ.get(DATA_DIR_ENV, str(DEFAULT_DATA_DIR))).expanduser().resolve()


def data_path(*parts: str) -> Path:
    """A path inside :func:`data_dir`, e.g. ``data_path("tokenizers", "gpt2")``."""
    return data_dir().joinpath(*parts)
