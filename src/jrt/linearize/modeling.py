"""The linearized student: a Llama-family Transformer whose softmax attention layers are recurrent mixers.

Every decoder layer keeps the teacher's norms, MLP and attention projections (same parameter names as the
teacher, so its state dict loads as is). Attention becomes :class:`LinearizedAttention`:

- queries/keys are rotated (the teacher's RoPE, at each token's position among the real tokens) and mapped per
  head by a learned projection ``[head_dim -> F]`` (``feature_q``, ``feature_k``) fed to the Taylor map of
  Based/JRT-RNN (``jrt.ops.linear_attention``: ``phi(q).phi(k) = 1 + s + s^2/2``, ``s = q'.k'/sqrt(F)``);
- optionally a softmax sliding window of ``window`` tokens (LoLCATs-style), mixed per head with a learned gate
  ``g = sigmoid(window_gate)``: ``o = g * o_window + (1 - g) * o_linear``;
- ``mode="jrt"``: JRT-RNN's prefix linear attention (``jrt.ops.prefix_linear_attention``): on the first call the
  first ``M`` real tokens are also read non-causally through encoder projections ``k_enc_proj``/``v_enc_proj``
  (initialised from the teacher's ``k_proj``/``v_proj``).

Grouped-query heads: keys, values and ``feature_k`` live on the teacher's key/value heads and are repeated to
the query heads. The decoding state per layer (:class:`LinearizedState`) is ``(S, z)`` of the linear attention
plus a ring buffer of ``window + 1`` keys/values: constant in the context length. Chunked prefill and
``T = 1`` decoding are the same call.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from jrt.layers import default_prefix_lengths
from jrt.linearize.configuration import SUPPORTED_FAMILIES, LinearizedConfig
from jrt.models.recurrent import (
    TRANSFORMERS_5,
    CausalLMHead,
    JRTCache,
    RecurrentPreTrainedModel,
    check_cache,
    model_output,
    new_token_mask,
    update_cache_counts,
)
from jrt.ops import (
    RingBuffer,
    feature_dim,
    linear_attention,
    positions_from_mask,
    prefix_linear_attention,
    sliding_window_attention,
    sliding_window_decode_step,
)


def family_classes(model_type: str) -> dict[str, Any]:
    """The teacher family's ``Attention``, ``MLP``, ``RMSNorm``, ``RotaryEmbedding`` and ``apply_rotary_pos_emb``."""
    prefix = SUPPORTED_FAMILIES[model_type]
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    out = {name: getattr(module, prefix + name) for name in ("Attention", "MLP", "RMSNorm", "RotaryEmbedding")}
    out["apply_rotary_pos_emb"] = module.apply_rotary_pos_emb
    return out


@dataclass
class LinearizedState:
    """Decoding state of one layer: ``linear = (S [B, Hkv, D, Dh], z [B, Hkv, D])`` (float32), ``ring`` the last
    ``window + 1`` rotated keys/values ``[B, W + 1, Hkv, Dh]`` (or None), ``seen [B]`` real tokens consumed so far.
    Both are per key/value head: the query heads of a group share them."""

    linear: tuple[torch.Tensor, torch.Tensor] | None
    ring: RingBuffer | None
    seen: torch.Tensor

    @property
    def is_empty(self) -> bool:
        return self.linear is None

    def nbytes(self) -> int:
        total = self.seen.numel() * self.seen.element_size()
        if self.linear is not None:
            total += sum(x.numel() * x.element_size() for x in self.linear)
        if self.ring is not None:
            total += self.ring.nbytes()
        return total

    def reorder(self, index: torch.Tensor) -> None:
        """Keep / repeat batch rows ``index`` in place."""
        self.seen = self.seen[index]
        if self.linear is not None:
            self.linear = (self.linear[0][index], self.linear[1][index])
        if self.ring is not None:
            self.ring = self.ring.reorder(index)


class LinearizedAttention(nn.Module):
    """The student mixer of layer ``layer_idx``: ``forward(hidden [B, T, d]) -> [B, T, d]``."""

    def __init__(self, config: LinearizedConfig, layer_idx: int) -> None:
        super().__init__()
        tc = config.teacher_config
        classes = family_classes(config.teacher["model_type"])
        teacher_attn = classes["Attention"](tc, layer_idx)  # the teacher's projections (shapes, biases)
        self.q_proj, self.k_proj = teacher_attn.q_proj, teacher_attn.k_proj
        self.v_proj, self.o_proj = teacher_attn.v_proj, teacher_attn.o_proj
        self.layer_idx = layer_idx
        self.num_heads = tc.num_attention_heads
        self.num_kv_heads = getattr(tc, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // self.num_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.feature = config.feature_dim
        self.window = config.window
        self.reads_prefix = config.reads_prefix
        self.impl = config.ops_impl
        self.eps = config.linear_attention_eps
        self.rotary = classes["RotaryEmbedding"](tc)
        self._apply_rotary = classes["apply_rotary_pos_emb"]
        self.feature_q = nn.Parameter(torch.empty(self.num_heads, self.head_dim, self.feature))
        self.feature_k = nn.Parameter(torch.empty(self.num_kv_heads, self.head_dim, self.feature))
        self.window_gate = nn.Parameter(torch.zeros(self.num_heads)) if self.window else None
        if self.reads_prefix:
            self.k_enc_proj = nn.Linear(tc.hidden_size, self.num_kv_heads * self.head_dim,
                                        bias=self.k_proj.bias is not None)
            self.v_enc_proj = nn.Linear(tc.hidden_size, self.num_kv_heads * self.head_dim,
                                        bias=self.v_proj.bias is not None)
        self.reset_feature_maps(torch.Generator().manual_seed(1234 + layer_idx))

    @torch.no_grad()
    def reset_feature_maps(self, generator: torch.Generator) -> None:
        """Random orthogonal projections scaled by ``(head_dim / F)^(1/4)``, the same for a query head and its key
        head, so that at initialisation ``q'.k'/sqrt(F)`` approximates the teacher's ``q.k/sqrt(head_dim)``
        on average; the window gate at 0 (an even mix)."""
        dh, f = self.head_dim, self.feature
        scale = (dh / f) ** 0.25
        for h in range(self.num_kv_heads):
            basis = torch.linalg.qr(torch.randn(dh, max(dh, f), generator=generator, dtype=torch.float64))[0]
            proj = (basis[:, :f] if f <= dh else torch.randn(dh, f, generator=generator, dtype=torch.float64)
                    / math.sqrt(f)) * scale
            self.feature_k[h] = proj.to(self.feature_k.dtype)
            self.feature_q[h * self.groups: (h + 1) * self.groups] = proj.to(self.feature_q.dtype)
        if self.window_gate is not None:
            self.window_gate.zero_()

    @torch.no_grad()
    def copy_encoder_from_teacher(self) -> None:
        """``jrt`` mode: the encoder projections start as copies of the teacher's key/value projections."""
        if not self.reads_prefix:
            return
        for enc, src in ((self.k_enc_proj, self.k_proj), (self.v_enc_proj, self.v_proj)):
            enc.weight.copy_(src.weight)
            if enc.bias is not None:
                enc.bias.copy_(src.bias)

    # ------------------------------------------------------------------------------------------ state

    def empty_state(self, batch: int) -> LinearizedState:
        return LinearizedState(None, None, torch.zeros(batch, dtype=torch.long, device=self.feature_q.device))

    def state_size_bytes(self, batch: int, dtype: torch.dtype, context_length: int | None = None) -> int:
        """Bytes of the decoding state for ``batch`` sequences (independent of ``context_length``)."""
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        size = torch.tensor([], dtype=state_dtype).element_size()
        total = batch * self.num_kv_heads * feature_dim(self.feature) * (self.head_dim + 1) * size + batch * 8
        if self.window:
            slots = self.window + 1
            item = torch.tensor([], dtype=dtype).element_size()
            total += 2 * batch * slots * self.num_kv_heads * self.head_dim * item + batch * slots * 8 + batch * 8
        return total

    # ------------------------------------------------------------------------------------------ pieces

    def _rotate_project(self, proj: nn.Linear, x: torch.Tensor, heads: int, cos, sin) -> torch.Tensor:
        b, t, _ = x.shape
        y = proj(x).view(b, t, heads, self.head_dim).transpose(1, 2)
        return self._apply_rotary(y, y, cos, sin)[0].transpose(1, 2)  # [B, T, heads, Dh]

    def _projections(self, x: torch.Tensor, mask: torch.Tensor | None, state: LinearizedState | None):
        """Rotated ``q [B, T, H, Dh]``, ``k [B, T, Hkv, Dh]``, ``v [B, T, Hkv, Dh]`` and ``(cos, sin)``."""
        b, t, _ = x.shape
        pos = positions_from_mask(mask, b, t, x.device)
        if state is not None:
            pos = pos + state.seen.to(x.device)[:, None]
        cos, sin = self.rotary(x, pos)
        q = self._rotate_project(self.q_proj, x, self.num_heads, cos, sin)
        k = self._rotate_project(self.k_proj, x, self.num_kv_heads, cos, sin)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        return q, k, v, (cos, sin)

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, Hkv, *] -> [B, T, H, *]`` (query head ``h`` uses key/value head ``h // groups``)."""
        return x.repeat_interleave(self.groups, dim=2) if self.groups > 1 else x

    def _features(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bthd,hdf->bthf", x, weight.to(x.dtype))

    def teacher_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None) -> torch.Tensor:
        """The teacher's causal softmax attention on rotated ``q, k, v``: ``[B, T, H, Dh]``."""
        t = q.shape[1]
        k, v = self._repeat(k), self._repeat(v)
        if mask is None:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, scale=self.head_dim**-0.5)
            return o.transpose(1, 2)
        return sliding_window_attention(q, k, v, t, attention_mask=mask, rotary_base=None)

    def student_attention(
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin,
        mask: torch.Tensor | None, prefix_lengths: torch.Tensor | None, state: LinearizedState | None,
    ) -> torch.Tensor:
        """The recurrent mixer on rotated ``q [B, T, H, Dh]``, ``k, v [B, T, Hkv, Dh]``: ``[B, T, H, Dh]``;
        updates ``state`` in place. The operators take the grouped-query heads as they are, so the state (linear
        and window) is kept per key/value head."""
        b, t = q.shape[:2]
        fresh = state is None or state.is_empty
        qf = self._features(q, self.feature_q)
        kf = self._features(k, self.feature_k)
        initial = None if fresh else state.linear
        want_state = state is not None
        if self.reads_prefix and fresh and prefix_lengths is not None and bool((prefix_lengths > 0).any()):
            cos, sin = cos_sin
            k_enc = self._rotate_project(self.k_enc_proj, x, self.num_kv_heads, cos, sin)
            v_enc = self.v_enc_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
            o_lin, lin_state = prefix_linear_attention(
                qf, kf, v, self._features(k_enc, self.feature_k), v_enc,
                prefix_lengths, attention_mask=mask, output_final_state=want_state, eps=self.eps, impl=self.impl,
            )
        else:
            o_lin, lin_state = linear_attention(qf, kf, v, initial_state=initial, output_final_state=want_state,
                                                eps=self.eps, attention_mask=mask, impl=self.impl)
        if not self.window:
            o = o_lin
        else:
            if fresh:
                o_win = sliding_window_attention(q, k, v, self.window, attention_mask=mask, rotary_base=None)
                if state is not None:
                    ring = RingBuffer.empty(b, self.window, self.num_kv_heads, self.head_dim, k.dtype, k.device)
                    state.ring = ring.write(k, v, mask)
            else:
                if mask is not None and not bool(mask.all()):
                    raise ValueError("padding is only allowed in the first call of a sequence (left padding)")
                o_win = torch.cat([
                    sliding_window_decode_step(q[:, i: i + 1], k[:, i: i + 1], v[:, i: i + 1], state.ring,
                                               rotary_base=None)
                    for i in range(t)
                ], dim=1)
            gate = torch.sigmoid(self.window_gate).to(o_lin.dtype)[:, None]
            o = gate * o_win.to(o_lin.dtype) + (1 - gate) * o_lin
        if state is not None:
            state.linear = lin_state
            state.seen = state.seen.to(q.device) + (mask.long().sum(-1) if mask is not None else t)
        return o

    # ------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
        state: LinearizedState | None = None,
    ) -> torch.Tensor:
        """``hidden_states [B, T, d]`` (after the layer's input norm) -> ``[B, T, d]``.

        ``attention_mask [B, T]`` bool (None: no padding); ``prefix_lengths [B]`` (``jrt`` mode, first call only);
        ``state`` is updated in place.
        """
        q, k, v, cos_sin = self._projections(hidden_states, attention_mask, state)
        o = self.student_attention(hidden_states, q, k, v, cos_sin, attention_mask, prefix_lengths, state)
        return self.o_proj(o.flatten(-2).to(hidden_states.dtype))

    def transfer(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention transfer: ``(teacher output, student output)``, both ``[B, T, d]``; the teacher's softmax
        attention runs without gradients, the student's causal linear attention (no prefix) with them."""
        with torch.no_grad():
            q, k, v, cos_sin = self._projections(hidden_states, attention_mask, None)
            teacher = self.o_proj(self.teacher_attention(q, k, v, attention_mask).flatten(-2))
        student = self.student_attention(hidden_states, q, k, v, cos_sin, attention_mask, None, None)
        return teacher, self.o_proj(student.flatten(-2).to(hidden_states.dtype))


class LinearizedDecoderLayer(nn.Module):
    """``h + attn(input_layernorm(h))`` then ``h + mlp(post_attention_layernorm(h))`` (the teacher's layout)."""

    def __init__(self, config: LinearizedConfig, layer_idx: int) -> None:
        super().__init__()
        tc = config.teacher_config
        classes = family_classes(config.teacher["model_type"])
        self.self_attn = LinearizedAttention(config, layer_idx)
        self.mlp = classes["MLP"](tc)
        self.input_layernorm = classes["RMSNorm"](tc.hidden_size, eps=tc.rms_norm_eps)
        self.post_attention_layernorm = classes["RMSNorm"](tc.hidden_size, eps=tc.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, prefix_lengths: torch.Tensor | None,
                state: LinearizedState | None, teacher: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the new hidden states and, with ``teacher=True``, the per-layer transfer loss (the hidden stream
        then follows the teacher)."""
        x = self.input_layernorm(hidden)
        loss = None
        if teacher:
            target, student = self.self_attn.transfer(x, mask)
            diff = (student - target).float()
            if mask is not None:
                diff = diff * mask[..., None]
                loss = diff.pow(2).sum() / (mask.sum() * diff.shape[-1]).clamp_min(1)
            else:
                loss = diff.pow(2).mean()
            mixed = target
        else:
            mixed = self.self_attn(x, mask, prefix_lengths, state)
        hidden = hidden + mixed
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), loss


class LinearizedPreTrainedModel(RecurrentPreTrainedModel):
    config_class = LinearizedConfig
    _no_split_modules = ["LinearizedDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        """``transformers``' default init (normal linear/embedding weights, unit norms, the rotary buffers; every
        kept weight is then overwritten by the teacher's); the student's feature maps by
        :meth:`LinearizedAttention.reset_feature_maps` unless they were loaded."""
        if isinstance(module, LinearizedAttention):
            if not getattr(module.feature_q, "_is_hf_initialized", False):
                module.reset_feature_maps(torch.Generator().manual_seed(1234 + module.layer_idx))
            return
        super()._init_weights(module)


class LinearizedModel(LinearizedPreTrainedModel):
    """Embeddings, decoder layers and final norm: hidden states ``[B, T, d]``."""

    def __init__(self, config: LinearizedConfig) -> None:
        super().__init__(config)
        tc = config.teacher_config
        self.embed_tokens = nn.Embedding(tc.vocab_size, tc.hidden_size, getattr(tc, "pad_token_id", None))
        self.layers = nn.ModuleList(LinearizedDecoderLayer(config, i) for i in range(tc.num_hidden_layers))
        self.norm = family_classes(config.teacher["model_type"])["RMSNorm"](tc.hidden_size, eps=tc.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def layer_mixers(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.layers]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | int | None = None,
        past_key_values: JRTCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        cache: JRTCache | None = None,
        transfer: bool = False,
        **kwargs: Any,
    ) -> LinearizedModelOutput:
        """Run the layers on ``input_ids [B, T]`` (``attention_mask`` may span the cache's consumed columns).

        ``prefix_lengths`` (``jrt`` mode, first call): real tokens read non-causally, default every real token capped
        at ``config.max_prefix_length``. ``transfer=True``: the teacher's forward with the per-layer attention
        transfer losses in ``.transfer_losses`` (a tuple of scalars, one per layer).
        """
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = hidden.shape[:2]
        check_cache(cache, b)
        past = cache.num_positions if cache is not None else 0
        mask = new_token_mask(attention_mask, b, t, past, hidden.device)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and not transfer
        if use_cache and cache is None:
            cache = self.make_cache(b, hidden.device)
        if cache is not None and not cache.is_empty:
            prefix_lengths = None
        elif self.config.reads_prefix and not transfer:
            if prefix_lengths is None:
                prefix_lengths = default_prefix_lengths(b, t, mask, self.config.max_prefix_length, hidden.device)
            else:
                prefix_lengths = torch.as_tensor(prefix_lengths, device=hidden.device).long().expand(b)
        else:
            prefix_lengths = None
        losses = []
        for i, layer in enumerate(self.layers):
            hidden, loss = layer(hidden, mask, prefix_lengths, cache.layers[i] if cache is not None else None,
                                 teacher=transfer)
            if loss is not None:
                losses.append(loss)
        hidden = self.norm(hidden)
        update_cache_counts(cache, mask, t, hidden.device)
        return model_output(LinearizedModelOutput, last_hidden_state=hidden, cache=cache if use_cache else None,
                            transfer_losses=tuple(losses) if transfer else None)


@dataclass
class LinearizedModelOutput(BaseModelOutputWithPast):
    """The student backbone's output; ``transfer_losses``: with ``transfer=True``, the attention-transfer loss of
    each layer (scalars: the MSE between the student's attention output and the teacher's), else None."""

    transfer_losses: tuple[torch.Tensor, ...] | None = None


class LinearizedForCausalLM(CausalLMHead, LinearizedPreTrainedModel, GenerationMixin):
    """The linearized student LM (``generate()`` with a constant-size recurrent cache)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config: LinearizedConfig) -> None:
        super().__init__(config)
        self.model = LinearizedModel(config)
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
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        cache: JRTCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits ``[B, T, vocab]``, the shifted next-token loss when ``labels [B, T]`` are given (-100 ignored) and
        the cache; arguments as :meth:`LinearizedModel.forward`."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, prefix_lengths=prefix_lengths,
                             cache=cache if cache is not None else past_key_values, use_cache=use_cache,
                             inputs_embeds=inputs_embeds)
        return self.head(outputs, labels, logits_to_keep, return_dict)


def register_auto_classes() -> None:
    """Register ``model_type="jrt_linearized"`` with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM``."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(LinearizedConfig.model_type, LinearizedConfig, exist_ok=True)
    AutoModel.register(LinearizedConfig, LinearizedModel, exist_ok=True)
    AutoModelForCausalLM.register(LinearizedConfig, LinearizedForCausalLM, exist_ok=True)


register_auto_classes()
