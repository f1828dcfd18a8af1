"""``LinearizedConfig``: a Llama-family Transformer whose softmax attention is replaced by recurrent mixers."""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from jrt.ops.common import check_impl

#: Teacher ``model_type`` -> class-name prefix in ``transformers.models.<type>.modeling_<type>`` (SmolLM2 is
#: a ``llama``).
SUPPORTED_FAMILIES: dict[str, str] = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
MODES = ("based", "jrt")


def check_teacher_type(model_type: str | None) -> str:
    """``model_type`` if it is a supported teacher family, else ``ValueError`` naming the supported ones."""
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"teacher architecture {model_type!r} is not supported: linearize takes Llama-family causal LMs "
            f"({', '.join(SUPPORTED_FAMILIES)}; SmolLM2 is a llama)"
        )
    return model_type


class LinearizedConfig(PretrainedConfig):
    """Configuration of a linearized student.

    Args:
        teacher: the teacher's configuration as a dict (``teacher_config.to_dict()``); its projections, MLPs,
            norms and embeddings are kept.
        mode: ``based`` (causal linear attention) or ``jrt`` (JRT-RNN prefix linear attention: the prompt's
            first ``M`` tokens are also read non-causally through encoder key/value projections).
        feature_dim: F, the learned per-head projection of the (rotated) queries/keys fed to the Taylor map
            (state ``1 + F + F^2`` rows per head).
        window: softmax sliding window (tokens back) mixed with the linear attention per head; 0 = none.
        max_prefix_length: cap of the default prefix (the prompt) in ``jrt`` mode.
        linear_attention_eps: denominator epsilon of the linear attention.
        mask_token_id: the masked-LM input id of the ``jrt`` objective.
        ops_impl: implementation of the linear-attention operators (as ``JRTConfig.ops_impl``: ``"auto"``,
            ``"chunk"``, ``"reference"``, ``"recurrent"``, ``"triton"``; ``$JRT_OPS_IMPL`` overrides ``"auto"``).
    """

    model_type = "jrt_linearized"

    def __init__(
        self,
        teacher: dict[str, Any] | None = None,
        mode: str = "based",
        feature_dim: int = 16,
        window: int = 64,
        max_prefix_length: int = 1024,
        linear_attention_eps: float = 1e-6,
        mask_token_id: int | None = None,
        use_cache: bool = True,
        ops_impl: str = "auto",
        **kwargs: Any,
    ) -> None:
        teacher = copy.deepcopy(teacher) if teacher is not None else {"model_type": "llama"}
        teacher.pop("transformers_version", None)
        check_teacher_type(teacher.get("model_type"))
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, value, low in (("feature_dim", feature_dim, 1), ("window", window, 0),
                                 ("max_prefix_length", max_prefix_length, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.teacher = teacher
        self.mode = mode
        self.feature_dim = feature_dim
        self.window = window
        self.max_prefix_length = max_prefix_length
        self.linear_attention_eps = linear_attention_eps
        self.mask_token_id = mask_token_id
        self.ops_impl = check_impl(ops_impl)
        self.use_cache = use_cache
        tc = self.teacher_config
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            setattr(self, name, getattr(tc, name))
        self.initializer_range = getattr(tc, "initializer_range", 0.02)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
            kwargs.setdefault(name, getattr(tc, name, None))
        super().__init__(**kwargs)

    @property
    def reads_prefix(self) -> bool:
        """Whether the student reads a non-causal prefix (``mode="jrt"``) rather than only causally (``based``)."""
        return self.mode == "jrt"

    @property
    def teacher_config(self) -> PretrainedConfig:
        """The teacher's configuration object (``LlamaConfig``, ``MistralConfig`` or ``Qwen2Config``)."""
        fields = {k: v for k, v in self.teacher.items() if k != "model_type"}
        return AutoConfig.for_model(self.teacher["model_type"], **fields)
