"""JRT-RNN as a Hugging Face model: ``JRTModel`` (the backbone) and ``JRTForCausalLM`` (tied LM head,
``generate()``), with a recurrent cache whose size does not grow with the context.

Block (docs/design.md, section 3): ``h = h + mixer(norm1(h)); h = h + mlp(norm2(h))`` with RMSNorm
pre-norms, a SwiGLU MLP and the residual stream kept in float32. No absolute positions (SWA uses rotary inside).
Each block builds its mixer from the registry :data:`jrt.layers.MIXERS` as ``MIXERS[config.mixers[i]](config, i)``;
the model never looks at mixer names.

Prefix: on the first call of a sequence, each PLA layer reads the first ``M_b`` real tokens non-causally;
``prefix_lengths`` sets ``M_b`` per sequence, by default the whole prompt capped at ``config.max_prefix_length``
(the rules live in :class:`jrt.layers.PrefixLinearAttention`; the model passes ``prefix_lengths`` through).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from jrt.layers import MIXERS, RMSNorm, SwiGLU
from jrt.models.configuration_jrt import JRTConfig
from jrt.ops.common import check_mask

try:  # transformers >= 5: init functions that skip parameters loaded from a checkpoint
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    _init = nn.init

_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
#: Name of the cache field of Hugging Face model outputs (``cache`` since transformers 5).
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class JRTCache:
    """Per-layer decoding state of a JRT model: constant size in the context length except for full
    ``"attention"`` layers.

    ``layers[i]`` is the state of layer ``i`` (``LinearAttentionState`` ``(S, z)`` for PLA/Based, a ring buffer of
    ``window + 1`` keys/values for SWA, ``ConvState`` for BaseConv). ``num_positions`` counts the input columns
    consumed so far (padding included: what ``generate``'s attention mask spans), ``seen_tokens [B]`` the real
    tokens per sequence.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, layers: list[Any], batch_size: int, device: torch.device | str | None = None) -> None:
        self.layers = layers
        self.batch_size = batch_size
        self.num_positions = 0
        self.seen_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Any:
        return self.layers[index]

    @property
    def is_empty(self) -> bool:
        return self.num_positions == 0

    @property
    def is_linear(self) -> list[bool]:
        # generate() reads this to decide whether to slice already-consumed ids: we keep a position count
        return [False] * len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input columns consumed so far (the length of the attention mask seen)."""
        return self.num_positions

    def nbytes(self) -> int:
        """Bytes held by the per-layer states (excluding the small bookkeeping counters)."""
        return sum(state.nbytes() for state in self.layers)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Select batch rows in place (beam search)."""
        for state in self.layers:
            state.reorder(beam_idx)
        self.seen_tokens = self.seen_tokens[beam_idx]
        self.batch_size = int(beam_idx.shape[0])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` ``[B']`` (the ``transformers.Cache`` name used when a batched
        generation drops finished rows)."""
        self.reorder_cache(indices)

    def activate_past_recording(self) -> None:  # pragma: no cover - only used by assisted decoding on mps
        raise NotImplementedError("JRTCache cannot roll back recurrent states")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("JRTCache cannot be cropped: recurrent states cannot forget tokens")


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """``ValueError`` unless ``input_ids`` is an integer ``[B, T]`` tensor with ``B >= 1`` and every id in
    ``[0, vocab_size)`` (one min/max reduction; torch would otherwise fail deep inside the embedding)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must have shape [B, T], got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids has batch size 0: pass at least one sequence")
    if input_ids.numel() == 0:
        return  # no positions: reported below with the other input checks
    lo, hi = (int(x) for x in torch.aminmax(input_ids))
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab_size}) of the model")


def _output(cls, **fields: Any):
    """Build a model output, naming the cache field as the installed transformers does."""
    if "cache" in fields and _CACHE_FIELD != "cache":
        fields[_CACHE_FIELD] = fields.pop("cache")
    return cls(**fields)


class JRTBlock(nn.Module):
    """Pre-norm block: ``h + mixer(norm1(h))`` then ``h + mlp(norm2(h))``."""

    def __init__(self, config: JRTConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.mixer_name = config.mixers[layer_idx]
        self.norm1 = RMSNorm(d, eps=config.rms_norm_eps)
        self.mixer = MIXERS[self.mixer_name](config, layer_idx)
        self.norm2 = RMSNorm(d, eps=config.rms_norm_eps) if config.use_mlp else None
        self.mlp = SwiGLU(d, config.intermediate_size) if config.use_mlp else None
        if hasattr(self.mixer, "out_proj"):
            self.mixer.out_proj._is_residual_output = True
        if self.mlp is not None:
            self.mlp.fc2._is_residual_output = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        prefix_lengths: torch.Tensor | None,
        state: Any,
    ) -> torch.Tensor:
        """``hidden_states [B, T, d]`` (residual stream) -> same shape and dtype."""
        dtype = self.norm1.weight.dtype
        mixed = self.mixer(self.norm1(hidden_states.to(dtype)), attention_mask, prefix_lengths, state)
        hidden_states = hidden_states + mixed.to(hidden_states.dtype)
        if self.mlp is None:
            return hidden_states
        return hidden_states + self.mlp(self.norm2(hidden_states.to(dtype))).to(hidden_states.dtype)


class JRTPreTrainedModel(PreTrainedModel):
    """Weight init, cache creation and state-size accounting shared by the JRT models."""

    config_class = JRTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["JRTBlock"]
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(initializer_range) for linear and embedding weights (output projections of the residual
        branches scaled by ``1/sqrt(2 * num_hidden_layers)``), zero biases, unit norms, PyTorch's default for
        the depthwise convolutions."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "_is_residual_output", False):
                _init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))
            else:
                _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Conv1d):
            _init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif isinstance(module, nn.RMSNorm) and module.weight is not None:
            _init.ones_(module.weight)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # the model builds its own recurrent cache (JRTCache), never a DynamicCache
        return False

    def _backbone(self) -> JRTModel:
        return self if isinstance(self, JRTModel) else self.model

    def make_cache(self, batch_size: int, device: torch.device | str | None = None) -> JRTCache:
        """An empty :class:`JRTCache` for ``batch_size`` sequences."""
        backbone = self._backbone()
        device = device if device is not None else backbone.embeddings.weight.device
        states = [block.mixer.empty_state(batch_size) for block in backbone.layers]
        return JRTCache(states, batch_size, device)

    def state_size_bytes(self, batch: int = 1, context_length: int | None = None) -> int:
        """Bytes of the decoding state for ``batch`` sequences: float32 ``(S, z)`` per PLA/Based layer, a ring of
        ``swa_window + 1`` keys/values per SWA layer and ``kernel_size - 1`` inputs per BaseConv, all constant in
        the context length. Full ``"attention"`` layers need ``context_length``."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        dtype = self._backbone().embeddings.weight.dtype
        return sum(block.mixer.state_size_bytes(batch, dtype, context_length) for block in self._backbone().layers)


class JRTModel(JRTPreTrainedModel):
    """The JRT-RNN backbone: embeddings, blocks, final RMSNorm. Returns hidden states ``[B, T, d]``."""

    def __init__(self, config: JRTConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embedding_dropout = nn.Dropout(getattr(config, "embedding_dropout", 0.0))
        self.layers = nn.ModuleList(JRTBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | int | None = None,
        past_key_values: JRTCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: JRTCache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """Run the blocks.

        Args:
            input_ids: ``[B, T]`` token ids (or ``inputs_embeds [B, T, d]``).
            attention_mask: ``[B, T]`` (1 = token, 0 = padding; left padding for batched prompts). With a
                non-empty cache it may also span the consumed columns, ``[B, cache.num_positions + T]``.
            prefix_lengths: int or int ``[B]``: real tokens read non-causally by PLA layers on the first call
                (default: every real token capped at ``config.max_prefix_length``). PLA layers reject a non-zero
                value with a non-empty cache; models without PLA layers ignore it.
            past_key_values / cache: a :class:`JRTCache` to continue from (updated in place).
            use_cache: create and return a cache (default ``config.use_cache`` outside training).

        Returns:
            ``BaseModelOutputWithPast`` with ``last_hidden_state [B, T, d]`` and the cache.
        """
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            check_input_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embedding_dropout(self.embeddings(input_ids))
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape [B, T, {self.config.hidden_size}], got {tuple(inputs_embeds.shape)}"
            )
        b, t = inputs_embeds.shape[:2]
        if t < 1:
            raise ValueError("the input must hold at least one position")
        if cache is not None and not isinstance(cache, JRTCache):
            raise ValueError(f"the cache must be a JRTCache (model.make_cache), got {type(cache).__name__}")
        if cache is not None and cache.batch_size != b:
            raise ValueError(f"the cache holds {cache.batch_size} sequences but the input has {b}")
        past = cache.num_positions if cache is not None else 0
        mask = self._new_token_mask(attention_mask, b, t, past, inputs_embeds.device)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = self.make_cache(b, inputs_embeds.device)

        if self.config.residual_in_fp32:  # float32 residual stream for bf16/fp16 models (float64 stays float64)
            hidden = inputs_embeds.to(torch.promote_types(inputs_embeds.dtype, torch.float32))
        else:
            hidden = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(hidden)
            state = cache.layers[i] if cache is not None else None
            if checkpoint and state is None:
                hidden = torch.utils.checkpoint.checkpoint(
                    block, hidden, mask, prefix_lengths, None, use_reentrant=False
                )
            else:
                hidden = block(hidden, mask, prefix_lengths, state)
        hidden = self.norm_f(hidden.to(self.norm_f.weight.dtype))
        if all_hidden is not None:
            all_hidden.append(hidden)
        if cache is not None:
            cache.num_positions += t
            cache.seen_tokens = cache.seen_tokens.to(hidden.device) + (
                mask.long().sum(-1) if mask is not None else t
            )
        returned_cache = cache if use_cache else None
        if return_dict is False:
            return tuple(x for x in (hidden, returned_cache, all_hidden) if x is not None)
        return _output(
            BaseModelOutputWithPast, last_hidden_state=hidden, cache=returned_cache,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )

    @staticmethod
    def _new_token_mask(
        attention_mask: torch.Tensor | None, b: int, t: int, past: int, device: torch.device
    ) -> torch.Tensor | None:
        """The ``[B, T]`` bool mask of the new tokens (None when every position is a token). Its values are checked
        here, once: the layers and operators below receive a bool tensor and check its shape only."""
        if attention_mask is None:
            return None
        if not torch.is_tensor(attention_mask) or attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be a 2-D tensor [B, T], got {tuple(getattr(attention_mask, 'shape', ()))}"
            )
        shape = tuple(attention_mask.shape)
        if shape == (b, past + t) and past:
            attention_mask = attention_mask[:, past:]
        elif shape != (b, t):
            expected = f"{(b, t)}" + (f" or {(b, past + t)}" if past else "")
            raise ValueError(f"attention_mask has shape {shape} but the input needs {expected}")
        mask = check_mask(attention_mask, b, t, device)
        return None if bool(mask.all()) else mask


class CausalLMHead:
    """The language-model head over a backbone ``self.model`` (embeddings, ``lm_head``, the shifted next-token loss),
    shared by :class:`JRTForCausalLM` and the linearized students of :mod:`jrt.linearize`."""

    model: nn.Module
    lm_head: nn.Linear

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def head(self, outputs: Any, labels: torch.LongTensor | None, logits_to_keep: int,
             return_dict: bool | None) -> CausalLMOutputWithPast | tuple:
        """Logits ``[B, T, vocab]`` of the backbone's ``outputs`` (the last ``logits_to_keep`` positions when > 0 and
        no labels), the shifted next-token loss when ``labels [B, T]`` are given (-100 = ignored), and the cache."""
        hidden = outputs.last_hidden_state
        if logits_to_keep and labels is None:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].to(logits.device).flatten(), ignore_index=-100
            )
        returned_cache = getattr(outputs, _CACHE_FIELD, None)
        hidden_states = getattr(outputs, "hidden_states", None)
        if return_dict is False:
            return tuple(x for x in (loss, logits, returned_cache, hidden_states) if x is not None)
        return _output(CausalLMOutputWithPast, loss=loss, logits=logits, cache=returned_cache,
                       hidden_states=hidden_states)


class JRTForCausalLM(CausalLMHead, JRTPreTrainedModel, GenerationMixin):
    """JRT-RNN language model: :class:`JRTModel` plus the (tied) LM head; works with ``generate()``."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"} if _TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config: JRTConfig) -> None:
        super().__init__(config)
        self.model = JRTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | int | None = None,
        past_key_values: JRTCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        cache: JRTCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits ``[B, T, vocab]`` (float32 when the model is), the standard shifted next-token loss when
        ``labels [B, T]`` are given (-100 = ignored), and the cache. Arguments as :meth:`JRTModel.forward`;
        ``logits_to_keep > 0`` computes logits for the last positions only."""
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, prefix_lengths=prefix_lengths,
            cache=cache if cache is not None else past_key_values, use_cache=use_cache,
            inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states, return_dict=True,
        )
        return self.head(outputs, labels, logits_to_keep, return_dict)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: JRTCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        prefix_lengths: torch.Tensor | None = None,
        cache: JRTCache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed the whole prompt on the first step (with ``prefix_lengths`` if given), then only the tokens the
        cache has not consumed."""
        cache = cache if cache is not None else past_key_values
        inputs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": use_cache}
        if cache is not None and not cache.is_empty:
            next_length = kwargs.get("next_sequence_length")
            if next_length is None and attention_mask is not None:
                next_length = attention_mask.shape[1] - cache.num_positions  # columns not consumed yet
            if next_length is None:
                next_length = input_ids.shape[1] - cache.num_positions
            if next_length < 1:
                raise ValueError("generation step without new tokens: the cache has consumed every position")
            inputs["input_ids"] = input_ids[:, -next_length:]
            inputs["cache"] = cache
        else:
            if inputs_embeds is not None:
                inputs["inputs_embeds"] = inputs_embeds
            else:
                inputs["input_ids"] = input_ids
            inputs["prefix_lengths"] = prefix_lengths
            if cache is not None:
                inputs["cache"] = cache
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def _reorder_cache(self, past_key_values: JRTCache, beam_idx: torch.Tensor) -> JRTCache:
        past_key_values.reorder_cache(beam_idx)
        return past_key_values
