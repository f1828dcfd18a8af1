"""The recurrent-LM base shared by every recurrent family of the package (JRT-RNN and its baselines in
:mod:`jrt.models.modeling_jrt`, the linearized students of :mod:`jrt.linearize`).

- :class:`JRTCache`: the per-layer decoding states, the columns consumed and the real tokens per sequence;
- :func:`new_token_mask`: the ``[B, T]`` bool mask of the new tokens, its values checked once;
- :class:`RecurrentPreTrainedModel`: ``make_cache`` and ``state_size_bytes`` over the backbone's
  :meth:`~RecurrentPreTrainedModel.layer_mixers`;
- :class:`CausalLMHead`: embeddings, ``lm_head``, the shifted next-token loss and the generation methods;
- :func:`model_output`, :func:`check_input_ids`, :func:`update_cache_counts`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from jrt.ops.common import check_mask

#: Whether the installed transformers is 5.x (the form of ``_tied_weights_keys`` depends on it).
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
#: Name of the cache field of Hugging Face model outputs (``cache`` since transformers 5).
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


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


def model_output(cls: type, **fields: Any) -> Any:
    """Build a model output, naming the cache field as the installed transformers does."""
    if "cache" in fields and CACHE_FIELD != "cache":
        fields[CACHE_FIELD] = fields.pop("cache")
    return cls(**fields)


def new_token_mask(
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


def update_cache_counts(cache: JRTCache | None, mask: torch.Tensor | None, t: int, device: torch.device) -> None:
    """After a call over ``t`` new columns with new-token ``mask [B, T]`` (None: all tokens): count them in
    ``cache`` (``num_positions`` += T, ``seen_tokens [B]`` += real tokens); nothing without a cache."""
    if cache is None:
        return
    cache.num_positions += t
    cache.seen_tokens = cache.seen_tokens.to(device) + (mask.long().sum(-1) if mask is not None else t)


def check_cache(cache: Any, batch: int) -> None:
    """``ValueError`` unless ``cache`` is None or a :class:`JRTCache` of ``batch`` sequences."""
    if cache is not None and not isinstance(cache, JRTCache):
        raise ValueError(f"the cache must be a JRTCache (model.make_cache), got {type(cache).__name__}")
    if cache is not None and cache.batch_size != batch:
        raise ValueError(f"the cache holds {cache.batch_size} sequences but the input has {batch}")


class RecurrentPreTrainedModel(PreTrainedModel):
    """Cache creation and state-size accounting of a recurrent backbone (or of a causal LM over one in
    ``self.model``). The backbone class implements :meth:`layer_mixers`."""

    base_model_prefix = "model"
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # the model builds its own recurrent cache (JRTCache), never a DynamicCache
        return False

    def recurrent_backbone(self) -> RecurrentPreTrainedModel:
        """The backbone: the model itself, or its ``self.model`` for a causal LM."""
        return self.model if "model" in self._modules else self

    def layer_mixers(self) -> list[nn.Module]:
        """The token mixer of each layer, in order (each has ``empty_state`` and ``state_size_bytes``); the
        backbone class implements it."""
        backbone = self.recurrent_backbone()
        if backbone is self:
            raise NotImplementedError(f"{type(self).__name__} must implement layer_mixers()")
        return backbone.layer_mixers()

    def make_cache(self, batch_size: int, device: torch.device | str | None = None) -> JRTCache:
        """An empty :class:`JRTCache` for ``batch_size`` sequences."""
        backbone = self.recurrent_backbone()
        device = device if device is not None else backbone.get_input_embeddings().weight.device
        return JRTCache([mixer.empty_state(batch_size) for mixer in backbone.layer_mixers()], batch_size, device)

    def state_size_bytes(self, batch: int = 1, context_length: int | None = None) -> int:
        """Bytes of the decoding state for ``batch`` sequences, the sum over the layers' mixers (for JRT-RNN:
        float32 ``(S, z)`` per PLA/Based layer, a ring of ``swa_window + 1`` keys/values per SWA layer and
        ``kernel_size - 1`` inputs per BaseConv, all constant in the context length; full ``"attention"`` layers
        need ``context_length``)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        backbone = self.recurrent_backbone()
        dtype = backbone.get_input_embeddings().weight.dtype
        return sum(mixer.state_size_bytes(batch, dtype, context_length) for mixer in backbone.layer_mixers())


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
        returned_cache = getattr(outputs, CACHE_FIELD, None)
        hidden_states = getattr(outputs, "hidden_states", None)
        if return_dict is False:
            return tuple(x for x in (loss, logits, returned_cache, hidden_states) if x is not None)
        return model_output(CausalLMOutputWithPast, loss=loss, logits=logits, cache=returned_cache,
                       hidden_states=hidden_states)

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
