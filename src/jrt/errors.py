"""Helpers for one-line errors about names: unknown keys with the closest valid name suggested."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` to ``name`` (``difflib``), else ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_known_keys(keys: Iterable[str], valid: Iterable[str], what: str) -> None:
    """Raise ``ValueError`` for the first key not in ``valid``: ``unknown WHAT 'swa_windw' (did you mean
    'swa_window'?)``, listing the valid names when none is close."""
    valid = sorted(set(valid))
    for key in keys:
        if key not in valid:
            hint = did_you_mean(str(key), valid)
            raise ValueError(f"unknown {what} {key!r}" + (hint or f"; valid: {', '.join(valid)}"))
