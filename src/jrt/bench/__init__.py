"""Throughput and memory benchmarks (``jrt bench ...``): each prints a table and writes JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | Path, payload: Any) -> Path:
    """Write a benchmark's ``payload`` as indented JSON to ``path`` (parent folders created) and say so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path
