"""JRT-RNN as a Hugging Face model: ``JRTModel`` (the backbone) and ``JRTForCausalLM`` (tied LM head,
``generate()``), with a recurrent cache whose size does not grow with the context.

Block (docs/design.md, section 3): ``h = h + mixer(norm1(h)); h = h + mlp(norm2(h))`` with RMSNorm
pre-norms, a SwiGLU MLP and the residual stream kept in float32. No absolute positions (SWA uses rotary inside).
Each block builds its mixer from the registry :data:`jrt.layers.MIXERS` as ``MIXERS[config.mixers[i]](config, i)``;
the model never looks at mixer names.

Prefix: on the first call of a sequence, each PLA layer reads the first ``M_b`` real tokens non-causally;
``prefix_lengths`` sets ``M_b`` per sequence, by default the whole prompt capped at ``config.max_prefix_length``
(the rule is :func:`jrt.layers.default_prefix_lengths`, applied by :class:`jrt.layers.PrefixLinearAttention`; the
model passes ``prefix_lengths`` through).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from jrt.layers import MIXERS, RMSNorm, SwiGLU
from jrt.models.configuration_jrt import JRTConfig
from jrt.models.recurrent import (
    TRANSFORMERS_5,
    CausalLMHead,
    JRTCache,
    RecurrentPreTrainedModel,
    check_cache,
    check_input_ids,
    model_output,
    new_token_mask,
    update_cache_counts,
)

try:  # transformers >= 5: init functions that skip parameters loaded from a checkpoint
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    _init = nn.init

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


class JRTPreTrainedModel(RecurrentPreTrainedModel):
    """Weight init, cache creation and state-size accounting shared by the JRT models."""

    config_class = JRTConfig
    supports_gradient_checkpointing = True
    _no_split_modules = ["JRTBlock"]

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

    def layer_mixers(self) -> list[nn.Module]:
        return [block.mixer for block in self.layers]

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
        inputs_embeds = self._embed(input_ids, inputs_embeds)
        b, t = inputs_embeds.shape[:2]
        check_cache(cache, b)
        past = cache.num_positions if cache is not None else 0
        mask = new_token_mask(attention_mask, b, t, past, inputs_embeds.device)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = self.make_cache(b, inputs_embeds.device)

        all_hidden = [] if output_hidden_states else None
        hidden = self._run_blocks(inputs_embeds, mask, prefix_lengths, cache, all_hidden)
        update_cache_counts(cache, mask, t, hidden.device)
        returned_cache = cache if use_cache else None
        if return_dict is False:
            return tuple(x for x in (hidden, returned_cache, all_hidden) if x is not None)
        return model_output(
            BaseModelOutputWithPast, last_hidden_state=hidden, cache=returned_cache,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )

    def _embed(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """Step 1: the checked input embeddings ``[B, T, d]`` of ``input_ids [B, T]`` (or ``inputs_embeds`` as
        given)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            check_input_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embedding_dropout(self.embeddings(input_ids))
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape [B, T, {self.config.hidden_size}], got {tuple(inputs_embeds.shape)}"
            )
        if inputs_embeds.shape[1] < 1:
            raise ValueError("the input must hold at least one position")
        return inputs_embeds

    def _run_blocks(self, inputs_embeds: torch.Tensor, mask: torch.Tensor | None, prefix_lengths: Any,
                    cache: JRTCache | None, all_hidden: list[torch.Tensor] | None) -> torch.Tensor:
        """Step 2: the blocks and the final norm over ``inputs_embeds [B, T, d]`` with the new-token ``mask [B, T]``
        (each block's state from ``cache``, updated in place); appends each block's input and the output to
        ``all_hidden`` when given. Returns ``[B, T, d]``."""
        if self.config.residual_in_fp32:  # float32 residual stream for bf16/fp16 models (float64 stays float64)
            hidden = inputs_embeds.to(torch.promote_types(inputs_embeds.dtype, torch.float32))
        else:
            hidden = inputs_embeds
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
        return hidden


class JRTForCausalLM(CausalLMHead, JRTPreTrainedModel, GenerationMixin):
    """JRT-RNN language model: :class:`JRTModel` plus the (tied) LM head; works with ``generate()``."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"} if TRANSFORMERS_5 else ["lm_head.weight"]

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


