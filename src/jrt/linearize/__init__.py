"""Linearizing a pretrained Llama-family Transformer into a recurrent (Based or JRT-RNN) student.

:class:`LinearizedConfig` / :class:`LinearizedForCausalLM` (``model_type="jrt_linearized"``, registered with the
``transformers`` Auto classes on import, which ``import jrt`` arranges), and the two-stage training of
``jrt linearize`` (:mod:`jrt.linearize.train`): attention transfer, then LoRA fine-tuning with ``peft``.
"""

from jrt.linearize.configuration import MODES, SUPPORTED_FAMILIES, LinearizedConfig, check_teacher_type
from jrt.linearize.modeling import (
    LinearizedAttention,
    LinearizedForCausalLM,
    LinearizedModel,
    LinearizedState,
    register_auto_classes,
)

register_auto_classes()

__all__ = [
    "MODES",
    "SUPPORTED_FAMILIES",
    "LinearizedAttention",
    "LinearizedConfig",
    "LinearizedForCausalLM",
    "LinearizedModel",
    "LinearizedState",
    "check_teacher_type",
    "register_auto_classes",
]
