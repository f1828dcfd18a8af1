"""``JRTConfig``: the Hugging Face configuration of JRT-RNN (and of its Based / attention baselines)."""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any

from transformers import PretrainedConfig

from jrt.errors import check_known_keys, did_you_mean
from jrt.layers import MIXERS
from jrt.ops.common import IMPLS

#: Mixer names registered when the package was imported (``jrt.layers.MIXERS`` is the live registry).
MIXER_NAMES = tuple(MIXERS)


def _pattern(layers: int, pla: tuple[int, ...], swa: tuple[int, ...], pla_name: str = "pla") -> list[str]:
    return [pla_name if i in pla else "swa" if i in swa else "base_conv" for i in range(layers)]


_PLA_360M = (1, 6, 11, 16, 21)
_SWA_360M = (2, 7, 12, 17, 22)
_PLA_1B = (1, 6, 11, 16, 21, 27, 33)
_SWA_1B = (2, 7, 12, 17, 22, 28, 34)

#: Published shapes (docs/design.md, section 4) and small test/demo shapes; ``from_preset``
#: copies these.
PRESETS: dict[str, dict[str, Any]] = {
    "jrt-360m": {
        "hidden_size": 1024, "num_hidden_layers": 26, "num_attention_heads": 16, "intermediate_size": 2048,
        "mixers": _pattern(26, _PLA_360M, _SWA_360M),
    },
    "jrt-1.3b": {
        "hidden_size": 1792, "num_hidden_layers": 36, "num_attention_heads": 16, "intermediate_size": 3584,
        "mixers": _pattern(36, _PLA_1B, _SWA_1B),
    },
    "based-360m": {
        "hidden_size": 1024, "num_hidden_layers": 26, "num_attention_heads": 16, "intermediate_size": 2048,
        "mixers": _pattern(26, _PLA_360M, _SWA_360M, pla_name="based"),
    },
    "jrt-tiny": {
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128,
        "mixers": ["base_conv", "pla", "swa", "base_conv"], "swa_window": 16, "max_prefix_length": 64,
    },
    "based-tiny": {
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128,
        "mixers": ["base_conv", "based", "swa", "base_conv"], "swa_window": 16, "max_prefix_length": 64,
    },
}


def config_fields() -> set[str]:
    """Names :class:`JRTConfig` accepts: its own arguments and the generic ``PretrainedConfig`` attributes."""
    own = {p for p in inspect.signature(JRTConfig.__init__).parameters if p not in ("self", "kwargs")}
    return own | set(PretrainedConfig().to_dict())


class JRTConfig(PretrainedConfig):
    """Configuration of :class:`jrt.models.JRTForCausalLM`.

    Args:
        vocab_size: GPT-2 vocabulary padded to a multiple of 8 (50264).
        hidden_size: model width d.
        num_hidden_layers: number of blocks.
        num_attention_heads: heads of the PLA / Based / SWA mixers (head dim ``hidden_size / heads``).
        feature_dim: query/key dim F of the linear-attention mixers before the Taylor map (16).
        mixers: one mixer name per layer, each a key of :data:`jrt.layers.MIXERS`: ``"base_conv"``, ``"pla"``,
            ``"based"``, ``"swa"``, ``"attention"`` (full causal softmax attention), or one added with
            :func:`jrt.layers.register_mixer`. Default: BaseConv everywhere except layer 1 (PLA) and layer 2 (SWA)
            when there are enough layers.
        swa_window: tokens back each SWA query sees (128 in the published models).
        intermediate_size: SwiGLU hidden width (default ``2 * hidden_size``).
        max_prefix_length: cap of the default prefix (the prompt) read non-causally by PLA layers (1024).
        mask_token_id: the MLM mask token of the training objective (50263).
        rms_norm_eps: RMSNorm epsilon.
        initializer_range: std of the normal init (output projections get ``std / sqrt(2 * layers)``).
        conv_kernel_size: BaseConv kernel length.
        conv_expand: BaseConv branch width relative to d (``in_proj`` d -> 2 * expand * d).
        rotary_base: rotary base of the attention mixers.
        linear_attention_eps: denominator epsilon of PLA / Based (1e-12 as published).
        residual_in_fp32: keep the residual stream in float32 whatever the parameter dtype.
        ops_impl: implementation of the linear-attention operators in PLA / Based layers: ``"auto"`` (Triton on
            CUDA, the chunked form elsewhere, the token loop for single tokens; the environment variable
            ``JRT_OPS_IMPL`` overrides ``"auto"``), ``"chunk"``, ``"reference"`` (quadratic: fewer kernel launches
            for short sequences), ``"recurrent"`` or ``"triton"``.
        use_mlp: give every block a SwiGLU MLP (False: mixer-only blocks, as in the authors' synthetic models).
        embedding_dropout: dropout on the token embeddings during training (0.1 in the authors' synthetics).
        tie_word_embeddings: share the embedding and LM-head matrices.
    """

    model_type = "jrt"

    def __init__(
        self,
        vocab_size: int = 50264,
        hidden_size: int = 1024,
        num_hidden_layers: int = 26,
        num_attention_heads: int = 16,
        feature_dim: int = 16,
        mixers: list[str] | None = None,
        swa_window: int = 128,
        intermediate_size: int | None = None,
        max_prefix_length: int = 1024,
        mask_token_id: int | None = 50263,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        conv_kernel_size: int = 3,
        conv_expand: int = 2,
        rotary_base: float | None = 10000.0,
        linear_attention_eps: float = 1e-12,
        residual_in_fp32: bool = True,
        ops_impl: str = "auto",
        use_mlp: bool = True,
        embedding_dropout: float = 0.0,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = 50256,
        eos_token_id: int | None = 50256,
        pad_token_id: int | None = 50256,
        **kwargs: Any,
    ) -> None:
        if mixers is None:
            mixers = _pattern(num_hidden_layers, (1,), (2,))
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.feature_dim = feature_dim
        self.mixers = list(mixers)
        self.swa_window = swa_window
        self.intermediate_size = intermediate_size if intermediate_size is not None else 2 * hidden_size
        self.max_prefix_length = max_prefix_length
        self.mask_token_id = mask_token_id
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.conv_kernel_size = conv_kernel_size
        self.conv_expand = conv_expand
        self.rotary_base = rotary_base
        self.linear_attention_eps = linear_attention_eps
        self.residual_in_fp32 = residual_in_fp32
        self.ops_impl = ops_impl
        self.use_mlp = use_mlp
        self.embedding_dropout = embedding_dropout
        self.use_cache = use_cache
        self.validate_jrt()
        super().__init__(
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings, **kwargs,
        )

    def validate_jrt(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "feature_dim",
                     "intermediate_size", "conv_kernel_size", "conv_expand"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.embedding_dropout < 1.0:
            raise ValueError(f"embedding_dropout must be in [0, 1), got {self.embedding_dropout!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if len(self.mixers) != self.num_hidden_layers:
            raise ValueError(
                f"mixers lists {len(self.mixers)} layers but num_hidden_layers is {self.num_hidden_layers}"
            )
        unknown = sorted({m for m in self.mixers if m not in MIXERS})
        if unknown:
            raise ValueError(f"unknown mixer name(s) {unknown}; choose from {', '.join(MIXERS)}")
        if isinstance(self.swa_window, bool) or not isinstance(self.swa_window, int) or self.swa_window < 0:
            raise ValueError(f"swa_window must be an int >= 0, got {self.swa_window!r}")
        if not isinstance(self.max_prefix_length, int) or self.max_prefix_length < 0:
            raise ValueError(f"max_prefix_length must be an int >= 0, got {self.max_prefix_length!r}")
        for name in ("rms_norm_eps", "linear_attention_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        base = self.rotary_base
        if base is not None and (isinstance(base, bool) or not isinstance(base, (int, float))
                                 or not math.isfinite(base) or base <= 0):
            raise ValueError(f"rotary_base must be a finite number > 0 or None, got {base!r}")
        if self.ops_impl not in IMPLS:
            raise ValueError(f"ops_impl must be one of {', '.join(IMPLS)}, got {self.ops_impl!r}")
        if any(m in ("swa", "attention") for m in self.mixers) and (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("attention mixers use rotary embedding: the head dim hidden_size/heads must be even")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> JRTConfig:
        """A configuration from :data:`PRESETS` (``"jrt-360m"``, ``"jrt-1.3b"``, ``"based-360m"``, ``"jrt-tiny"``,
        ``"based-tiny"``), with any field overridden by keyword.

        Raises:
            ValueError: unknown preset name, or an override that is not a configuration field (the closest
                field is suggested).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}{did_you_mean(name, PRESETS)}; "
                             f"choose one of {', '.join(PRESETS)}")
        check_known_keys(overrides, config_fields(), "JRTConfig field")
        fields = copy.deepcopy(PRESETS[name])
        if "num_hidden_layers" in overrides and "mixers" not in overrides:
            raise ValueError("overriding num_hidden_layers of a preset needs an explicit mixers list")
        fields.update(overrides)
        return cls(**fields)
