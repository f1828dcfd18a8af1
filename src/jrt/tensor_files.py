"""Reading tensor files (``*.safetensors``, ``*.bin`` / ``*.pt`` written by ``torch.save``) with one-line errors.

Shared by the trainer's checkpoint loader and the checkpoint converter, so that a missing, truncated or foreign
file is reported the same way everywhere: ``checkpoint WHERE is incomplete: no FILE`` or ``checkpoint WHERE is
corrupt: cannot read FILE (reason)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class CorruptFileError(ValueError):
    """A file of a checkpoint is missing, truncated or unreadable (the caller may fall back to an older one)."""


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].split(". ")[0][:160] if text else type(err).__name__


def read_tensor_file(path: str | Path, where: str | Path | None = None) -> Any:
    """The content of a ``.safetensors`` file (``{name: tensor}``) or of a ``torch.save`` file (loaded with
    ``weights_only=True`` on the CPU).

    Args:
        path: the file.
        where: the checkpoint it belongs to, for messages (default: its folder).

    Raises:
        CorruptFileError: (a ``ValueError``) the file is missing, truncated or not a tensor file (one line, naming
            checkpoint and file).
    """
    path = Path(path)
    where = path.parent if where is None else where
    if not path.is_file():
        raise CorruptFileError(f"checkpoint {where} is incomplete: no {path.name}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors / pickle / zip errors of a truncated or foreign file
        raise CorruptFileError(f"checkpoint {where} is corrupt: cannot read {path.name} ({_reason(err)})") from None


def read_json_file(path: str | Path, what: str = "file") -> Any:
    """A JSON file's content; ``ValueError`` naming the file when it is missing, not UTF-8 or not JSON."""
    import json

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} {path} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON ({_reason(err)})") from None
