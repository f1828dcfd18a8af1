"""JRT-Prompt: read-twice prompts for any causal language model (templates per task and mode)."""

from jrt.prompting.templates import (
    FORMATS,
    MODES,
    TASK_FAMILY,
    TEMPLATES,
    PromptFormat,
    build_prompt,
    mode_repeats,
    read_twice,
    task_format,
)

__all__ = [
    "FORMATS",
    "MODES",
    "TASK_FAMILY",
    "TEMPLATES",
    "PromptFormat",
    "build_prompt",
    "mode_repeats",
    "read_twice",
    "task_format",
]
