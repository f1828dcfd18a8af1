"""Linearizing a pretrained Llama-family Transformer into a recurrent (Based or JRT-RNN) student.

:class:`LinearizedConfig` / :class:`LinearizedForCausalLM` (``model_type="jrt_linearized"``, registered with the
``transformers`` Auto classes when :mod:`jrt.linearize.modeling` is imported, which ``import jrt`` arranges as soon
as ``transformers`` is imported), and the two-stage training of ``jrt linearize`` (:mod:`jrt.linearize.train`):
attention transfer, then LoRA fine-tuning with ``peft``. Attributes are imported lazily (``jrt --help`` stays
fast).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MODES": "configuration",
    "SUPPORTED_FAMILIES": "configuration",
    "LinearizedConfig": "configuration",
    "check_teacher_type": "configuration",
    "LinearizedAttention": "modeling",
    "LinearizedForCausalLM": "modeling",
    "LinearizedModel": "modeling",
    "LinearizedState": "modeling",
    "register_auto_classes": "modeling",
    "LinearizeConfig": "train",
    "Linearizer": "train",
    "apply_delta": "train",
    "build_student": "train",
    "load_teacher": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jrt.linearize' has no attribute {name!r}")
    return getattr(importlib.import_module(f"jrt.linearize.{_EXPORTS[name]}"), name)
