"""The public operators of the family: :func:`linear_attention` and :func:`prefix_linear_attention`.

Both validate their inputs, drop padding, and run one of the forms of :data:`FORMS` (the one dispatch table of
the family). The prefix operator is computed as one encoder state per sequence, added to the initial state of
the causal pass, so its cost is linear in T. Padded positions (``attention_mask == 0``) are removed from every
sum *after* the feature map (``phi(0) != 0``): their keys and ``[v, 1]`` rows are replaced by zeros (a select,
so that a NaN or inf at a padded position cannot leak into the other positions).

All PyTorch forms accumulate in float32 (float64 for float64 inputs) and exchange the state
``(S [B, H, D, Dv], z [B, H, D])`` in that dtype with the full map's ``D = 1+F+F^2``.

Grouped-query heads (``q`` with ``H`` heads, ``k``/``v`` with ``Hkv``, ``H`` a multiple): the state is kept per
key/value head (the ``H / Hkv`` query heads of a group would hold identical copies), so a GQA model's decoding
state is ``H / Hkv`` times smaller. A decoding step (one token, no padding, no encoder) reads the shared state
directly; every other call repeats keys, values and state for the form and keeps one state per group.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from jrt.ops.based import naive, native, recurrent
from jrt.ops.based.layout import Encoder, chunked, pytorch_form
from jrt.ops.common import (
    State,
    check_eps,
    check_float,
    check_impl,
    check_mask,
    check_prefix_lengths,
    check_qkv,
    check_state,
)
from jrt.ops.feature_map import feature_dim, taylor_feature_map

#: Environment variable that overrides ``impl="auto"`` (e.g. ``JRT_OPS_IMPL=chunk``).
IMPL_ENV = "JRT_OPS_IMPL"


def triton_available() -> bool:
    """True when the Triton kernels (``jrt.ops.triton``) import."""
    try:
        import jrt.ops.triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installation
        return False
    return True


def resolve_impl(impl: str, device: torch.device, length: int, feature: int | None = None) -> str:
    """The implementation that ``impl`` stands for on ``device`` for ``length`` tokens of feature dim ``feature``.

    ``auto`` honours ``JRT_OPS_IMPL`` when set; otherwise it takes Triton on CUDA when it imports and supports
    the feature dim, the token loop for single tokens (decoding), the native kernel on CPUs where it builds
    (:mod:`.native`; the operators fall back to the chunked form for float64 inputs), and the chunked form
    everywhere else.
    """
    check_impl(impl)
    if impl != "auto":
        return impl
    forced = os.environ.get(IMPL_ENV, "").strip()
    if forced and forced != "auto":
        return check_impl(forced)
    if device.type == "cuda" and triton_available():
        import jrt.ops.triton as kernels

        if feature is None or feature <= kernels.MAX_FEATURE_DIM:
            return "triton"
    if length == 1:
        return "recurrent"
    return "native" if device.type == "cpu" and native.available() else "chunk"


def _settle(requested: str, impl: str, *tensors) -> str:
    """``native`` chosen by ``auto`` gives way to the chunked form where it cannot run (float64 inputs)."""
    if impl == "native" and requested == "auto" and not native.supports(*tensors):
        return "chunk"
    return impl


def _triton(q, k, v, keep, state0: State | None, encoder: Encoder | None, eps: float, output_final_state: bool):
    """The Triton kernels (imported on first use: Triton is optional)."""
    if not triton_available():
        raise ValueError(
            "impl='triton' needs the Triton kernels (pip install 'just-read-twice[triton]' and a CUDA device, "
            "or TRITON_INTERPRET=1 for CPU tensors)"
        )
    import jrt.ops.triton as kernels

    if encoder is None:
        return kernels.linear_attention(q, k, v, initial_state=state0, output_final_state=output_final_state,
                                        eps=eps, attention_mask=keep)
    k_enc, v_enc, lengths = encoder
    return kernels.prefix_linear_attention(q, k, v, k_enc, v_enc, lengths, attention_mask=keep,
                                           initial_state=state0, output_final_state=output_final_state, eps=eps)


#: The one dispatch table of both operators: ``impl`` -> form on the public layout.
FORMS: dict[str, Callable] = {
    "reference": pytorch_form(naive.forward),
    "chunk": pytorch_form(chunked, divides=True),
    "recurrent": pytorch_form(recurrent.forward),
    "triton": _triton,
    "native": native.form,
}


def _grouped(impl: str, q, k, v, keep, state0: State | None, encoder: Encoder | None, eps: float,
             output_final_state: bool, groups: int):
    """Grouped-query heads: ``q [B, T, H, F]``, ``k, v [B, T, Hkv, *]``, state ``[B, Hkv, ...]``. A decoding step
    of the full-map forms reads the shared state directly (the chunked form keeps its own, equivalent, layout of
    the symmetric second-order terms, so it goes through the repeated heads)."""
    if q.shape[1] == 1 and keep is None and encoder is None and impl in ("recurrent", "reference"):
        return _grouped_step(q, k, v, state0, eps, groups)

    def repeat(x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.repeat_interleave(groups, dim=dim)

    state = None if state0 is None else (repeat(state0[0], 1), repeat(state0[1], 1))
    enc = None if encoder is None else (repeat(encoder[0], 2), repeat(encoder[1], 2), encoder[2])
    o, final = FORMS[impl](q, repeat(k, 2), repeat(v, 2), keep, state, enc, eps, output_final_state)
    if final is not None:  # the query heads of a group hold the same state: keep the first of each group
        final = (final[0][:, ::groups].contiguous(), final[1][:, ::groups].contiguous())
    return o, final


def _grouped_step(q, k, v, state0: State | None, eps: float, groups: int):
    """One token per sequence with grouped heads: ``S += phi(k) v^T``, ``z += phi(k)`` per key/value head, then
    every query head of the group reads them: ``o = phi(q) S / (phi(q) z + eps)``."""
    b, _, h, _ = q.shape
    hkv, dv = k.shape[2], v.shape[-1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    phi_k = taylor_feature_map(k[:, 0].to(dtype))  # [B, Hkv, D]
    s = phi_k[..., None] * v[:, 0, :, None, :].to(dtype)
    z = phi_k
    if state0 is not None:
        s, z = state0[0].to(dtype) + s, state0[1].to(dtype) + z
    phi_q = taylor_feature_map(q[:, 0].to(dtype)).view(b, hkv, groups, -1)  # [B, Hkv, G, D]
    num = phi_q @ s  # [B, Hkv, G, Dv]
    den = phi_q @ z[..., None]  # [B, Hkv, G, 1]
    o = (num / (den + eps)).reshape(b, 1, h, dv).to(v.dtype)
    return o, (s, z)


# --------------------------------------------------------------------------------------------------
# public operators
# --------------------------------------------------------------------------------------------------


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    initial_state: State | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    attention_mask: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, State | None]:
    """Causal, normalised Based linear attention with the Taylor feature map applied inside.

    ``o_i = phi(q_i) . S_i / (phi(q_i) . z_i + eps)`` with ``S_i = S_0 + sum_{j<=i} phi(k_j) v_j^T`` and
    ``z_i = z_0 + sum_{j<=i} phi(k_j)``.

    Args:
        q, k: ``[B, T, H, F]`` raw query/key projections (``k`` may have ``Hkv`` heads, ``H`` a multiple of
            ``Hkv``: grouped-query heads, see the module docstring).
        v: ``[B, T, H, Dv]`` values (``[B, T, Hkv, Dv]`` with grouped heads).
        initial_state: ``(S [B, H, D, Dv], z [B, H, D])`` (``Hkv`` heads when grouped) carried over from the
            previous part of the sequences (``D = 1+F+F^2``); running two halves with state handoff equals running
            the whole.
        output_final_state: also return the state after the last position.
        eps: added to the denominator (>= 0).
        attention_mask: ``[B, T]``, 1 for tokens and 0 for padding (left or right); padded positions add
            nothing to any sum, whatever they hold (their own outputs are meaningless).
        impl: ``"reference"`` (quadratic), ``"chunk"`` (linear in T), ``"recurrent"`` (token loop),
            ``"triton"`` (GPU kernels), ``"native"`` (the compiled CPU kernel) or ``"auto"``.

    Returns:
        ``(o, state)``: ``o [B, T, H, Dv]`` in ``v``'s dtype; ``state = (S, z)`` in float32 (float64 for
        float64 inputs under the PyTorch forms), or None when ``output_final_state`` is False.
    """
    groups = check_qkv(q, k, v, grouped=True)
    eps = check_eps(eps)
    b, t, h, f = q.shape
    mask = check_mask(attention_mask, b, t, q.device)
    state0 = check_state(initial_state, b, k.shape[2], feature_dim(f), v.shape[-1], q.device)
    impl = _settle(impl, resolve_impl(impl, q.device, t, f), q, k, v, *(state0 or ()))
    if groups > 1 and impl != "native":
        return _grouped(impl, q, k, v, mask, state0, None, eps, output_final_state, groups)
    return FORMS[impl](q, k, v, mask, state0, None, eps, output_final_state)


def prefix_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_enc: torch.Tensor,
    v_enc: torch.Tensor,
    prefix_lengths: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    impl: str = "auto",
) -> tuple[torch.Tensor, State | None]:
    """JRT-RNN's prefix linear attention: the causal pass plus a non-causal read of each prefix.

    ``o_i = phi(q_i) . (S_i + S_enc) / (phi(q_i) . (z_i + z_enc) + eps)`` with
    ``S_enc = sum_{j<M_b} phi(ke_j) ve_j^T`` and ``z_enc = sum_{j<M_b} phi(ke_j)`` over the first ``M_b`` real
    tokens of sequence ``b``.

    Args:
        q, k: ``[B, T, H, F]`` decoder query/key projections; ``v``: ``[B, T, H, Dv]`` (``k``, ``v`` and the
            encoder's may have ``Hkv`` heads: grouped-query heads, see the module docstring).
        k_enc, v_enc: ``[B, T, H, F]`` and ``[B, T, H, Dv]``, the encoder projections at the same positions.
        prefix_lengths: int ``[B]``, the prefix length ``M_b`` of each sequence counted in real tokens
            (0 allowed: the op then equals :func:`linear_attention`).
        attention_mask: ``[B, T]``, 1 = token, 0 = padding (left or right); pads add nothing to any sum.
        initial_state: ``(S, z)`` from an earlier part of the sequences; the encoder sum of this call is
            added to it.
        output_final_state: return the decoding state ``(S_T + S_enc, z_T + z_enc)``.
        eps: added to the shared denominator (>= 0).
        impl: as in :func:`linear_attention`.

    Returns:
        ``(o [B, T, H, Dv] in v's dtype, state or None)``.
    """
    groups = check_qkv(q, k, v, grouped=True)
    check_float("k_enc", k_enc, 4)
    check_float("v_enc", v_enc, 4)
    if k_enc.shape != k.shape or v_enc.shape != v.shape:
        raise ValueError(
            f"k_enc/v_enc must have the shapes of k/v, got k_enc {tuple(k_enc.shape)} vs k {tuple(k.shape)}, "
            f"v_enc {tuple(v_enc.shape)} vs v {tuple(v.shape)}"
        )
    eps = check_eps(eps)
    b, t, h, f = q.shape
    mask = check_mask(attention_mask, b, t, q.device)
    lengths = check_prefix_lengths(prefix_lengths, b, t, mask, q.device)
    state0 = check_state(initial_state, b, k.shape[2], feature_dim(f), v.shape[-1], q.device)
    impl = _settle(impl, resolve_impl(impl, q.device, t, f), q, k, v, k_enc, v_enc, *(state0 or ()))
    if groups > 1 and impl != "native":
        return _grouped(impl, q, k, v, mask, state0, (k_enc, v_enc, lengths), eps, output_final_state, groups)
    return FORMS[impl](q, k, v, mask, state0, (k_enc, v_enc, lengths), eps, output_final_state)
