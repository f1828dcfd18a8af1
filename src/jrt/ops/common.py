"""The bottom of :mod:`jrt.ops`: input checks and mask helpers shared by every operator form, the Triton
kernels and the layers. It imports nothing from the rest of ``jrt``.

Every problem is reported as a one-line ``ValueError`` that names the argument.
"""

from __future__ import annotations

import contextlib
import math

import torch

#: A linear-attention state ``(S [B, H, D, Dv], z [B, H, D])``.
State = tuple[torch.Tensor, torch.Tensor]
#: Implementations of the linear-attention operators (``"auto"`` picks one per call).
IMPLS = ("auto", "reference", "chunk", "recurrent", "triton", "native")


def check_float(name: str, x: object, dims: int) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (float32, float64, bfloat16...), got {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(x.shape)}")
    return x


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grouped: bool = False) -> int:
    """``q: [B, T, H, F]``, ``k: [B, T, Hkv, F]``, ``v: [B, T, Hkv, Dv]`` on one device; returns ``H // Hkv``.

    ``Hkv = H`` unless ``grouped`` (grouped-query heads: query head ``h`` reads key/value head ``h // (H // Hkv)``,
    ``H`` a multiple of ``Hkv``)."""
    check_float("q", q, 4)
    check_float("k", k, 4)
    check_float("v", v, 4)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same feature dim [B, T, H, F], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if q.shape[:2] != v.shape[:2] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            "q, k and v must agree on batch, length and heads [B, T, H, *], got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads != kv_heads and not (grouped and kv_heads >= 1 and heads % kv_heads == 0):
        raise ValueError(
            ("q's heads must be a multiple of k's and v's (grouped-query heads)" if grouped else
             "q, k and v must agree on batch, length and heads [B, T, H, *]")
            + f", got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[0] < 1:
        raise ValueError("the batch must hold at least one sequence (B >= 1)")
    if q.shape[1] < 1:
        raise ValueError("sequences must hold at least one position (T >= 1)")
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"feature and value dimensions must be >= 1, got F={q.shape[-1]}, Dv={v.shape[-1]}")
    if len({q.device, k.device, v.device}) != 1:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    return heads // kv_heads


def check_mask(attention_mask: object, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
    """``[B, T]`` with 1 for tokens and 0 for padding; returned as a bool tensor on ``device``."""
    if attention_mask is None:
        return None
    if not torch.is_tensor(attention_mask):
        raise ValueError(f"attention_mask must be a tensor [B, T], got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"attention_mask must have shape [B, T] = {(batch, length)}, got {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    return attention_mask.to(device=device, dtype=torch.bool)


def check_prefix_lengths(
    prefix_lengths: object, batch: int, length: int, mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Per-sequence prefix lengths ``[B]`` (ints), each within ``0..(number of real tokens)``."""
    if isinstance(prefix_lengths, int):
        prefix_lengths = torch.full((batch,), prefix_lengths, dtype=torch.long)
    elif isinstance(prefix_lengths, (list, tuple)):
        prefix_lengths = torch.tensor(prefix_lengths, dtype=torch.long)
    if not torch.is_tensor(prefix_lengths):
        raise ValueError(f"prefix_lengths must be an int tensor [B], got {type(prefix_lengths).__name__}")
    if prefix_lengths.is_floating_point() or prefix_lengths.dtype == torch.bool:
        raise ValueError(f"prefix_lengths must be an integer tensor, got {prefix_lengths.dtype}")
    if tuple(prefix_lengths.shape) != (batch,):
        raise ValueError(f"prefix_lengths must have shape [B] = ({batch},), got {tuple(prefix_lengths.shape)}")
    prefix_lengths = prefix_lengths.to(device=device, dtype=torch.long)
    if bool((prefix_lengths < 0).any()):
        raise ValueError(f"prefix lengths must be >= 0, got {prefix_lengths.tolist()}")
    available = mask.sum(-1) if mask is not None else torch.full_like(prefix_lengths, length)
    if bool((prefix_lengths > available).any()):
        bad = [(b, int(m), int(n)) for b, (m, n) in enumerate(zip(prefix_lengths, available)) if m > n]
        raise ValueError(
            "prefix length larger than the sequence: "
            + ", ".join(f"sequence {b}: prefix {m} > {n} tokens" for b, m, n in bad)
        )
    return prefix_lengths


def check_state(
    initial_state: object, batch: int, heads: int, dim: int, dv: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(S [B, H, D, Dv], z [B, H, D])``."""
    if initial_state is None:
        return None
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
        raise ValueError("initial_state must be a pair (S [B, H, D, Dv], z [B, H, D])")
    s, z = initial_state
    check_float("initial_state S", s, 4)
    check_float("initial_state z", z, 3)
    if tuple(s.shape) != (batch, heads, dim, dv) or tuple(z.shape) != (batch, heads, dim):
        raise ValueError(
            f"initial_state must be S {(batch, heads, dim, dv)} and z {(batch, heads, dim)}, got "
            f"S {tuple(s.shape)} and z {tuple(z.shape)}"
        )
    return s.to(device), z.to(device)


def check_eps(eps: object, name: str = "eps") -> float:
    """A finite float ``>= 0`` (added to a denominator)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {eps!r}")
    return float(eps)


def check_impl(impl: str, allowed: tuple[str, ...] = IMPLS) -> str:
    if impl not in allowed:
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(allowed)}")
    return impl


def split_impl(name: str) -> tuple[str, str | None]:
    """``"NAME@IMPL"`` -> ``("NAME", "IMPL")`` with ``IMPL`` checked, ``"NAME"`` -> ``("NAME", None)``: a benchmark
    method or training preset run on its own implementation, so that two are compared side by side in one run."""
    base, _, impl = name.partition("@")
    return base, (check_impl(impl) if impl else None)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32 (bfloat16/float16 inputs accumulate in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def prefix_positions(prefix_lengths: torch.Tensor, length: int, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, T]`` bool: the positions that belong to each sequence's prefix (its first ``M_b`` real tokens).

    ``prefix_lengths``: long ``[B]``; ``mask``: bool ``[B, T]`` (True = token) or None.
    """
    if mask is None:
        index = torch.arange(length, device=prefix_lengths.device).expand(prefix_lengths.shape[0], length)
        return index < prefix_lengths[:, None]
    index = mask.long().cumsum(-1) - 1  # index among real tokens
    return mask & (index < prefix_lengths[:, None])


def drop_rows(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Zero the time rows of ``x [B, T, ...]`` where ``keep [B, T]`` is False.

    A select, not a multiply: a NaN or inf in a dropped row must not survive (``nan * 0`` is NaN).
    """
    if keep is None:
        return x
    keep = keep.reshape(*keep.shape, *([1] * (x.dim() - 2)))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def exact(device: torch.device):
    """Switch autocast off: the operators choose their own precision (float32 accumulation)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
