"""The public layout of the operators around the PyTorch forms' internal one (see :mod:`jrt.ops.based`).

A form on the public layout::

    form(q, k, v [B, T, H, *], keep [B, T] bool | None, state0 (S, z) | None,
         encoder (k_enc, v_enc, prefix_lengths [B]) | None, eps, output_final_state) -> (o [B, T, H, Dv], state | None)

:func:`pytorch_form` builds one from an internal-layout core (:mod:`.naive`, :mod:`.recurrent`, :func:`chunked`);
the Triton kernels (:mod:`jrt.ops.triton`) have this signature directly and recompute their backward pass through
``pytorch_form(chunked)``. Inputs are validated by :mod:`.api` before they get here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from jrt.ops.based import chunk, chunk_inference
from jrt.ops.common import State, compute_dtype, drop_rows, exact, prefix_positions

#: ``(k_enc [B, T, H, F], v_enc [B, T, H, Dv], prefix_lengths [B])`` of the prefix operator.
Encoder = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def chunked(q, k, v1, state0, encoder, eps: float | None = None):
    """The chunked form: differentiable when autograd needs it, else the inference variant. With ``eps`` it
    returns ``(o [B, T, H, Dv], state)``, the division done (by the inference variant while its numerator is in
    cache), instead of ``(o1, state)``."""
    tensors = (q, k, v1, state0) + (tuple(encoder) if encoder is not None else ())
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        o1, state = chunk.forward(q, k, v1, state0, encoder)
        return (o1, state) if eps is None else (chunk.divide(o1, eps), state)
    return chunk_inference.forward(q, k, v1, state0, encoder, eps)


def pytorch_form(core: Callable, divides: bool = False) -> Callable:
    """A form on the public layout around ``core`` (the internal layout of :mod:`jrt.ops.based`): puts the
    inputs in the compute dtype and ``[B, H, T, *]`` layout, replaces dropped keys and ``[v, 1]`` rows by zeros
    (a select: a NaN or inf at a padded position cannot leak), cuts the encoder inputs after the last prefix
    position, and divides numerator by denominator (``divides``: ``core`` takes ``eps`` and divides itself,
    returning ``o [B, T, H, Dv]``, as :func:`chunked` does)."""

    def form(q, k, v, keep, state0: State | None, encoder: Encoder | None, eps: float, output_final_state: bool):
        dtype = compute_dtype(q, k, v, *(encoder[:2] if encoder is not None else ()))
        with exact(q.device):
            packed0 = None
            if state0 is not None:
                packed0 = torch.cat([state0[0].to(dtype), state0[1].to(dtype).unsqueeze(-1)], dim=-1)
            qh, kh, v1 = _internal(q, dtype), _internal(drop_rows(k, keep), dtype), _values(v, keep, dtype)
            enc = None
            if encoder is not None:
                k_enc, v_enc, lengths = encoder
                in_prefix = prefix_positions(lengths, q.shape[1], keep)
                # the encoder sum runs over the positions up to the last prefix token of any sequence
                hit = in_prefix.any(dim=0).nonzero()
                cut = int(hit[-1]) + 1 if hit.numel() else 0
                if cut:
                    in_prefix = in_prefix[:, :cut]
                    enc = (_internal(drop_rows(k_enc[:, :cut], in_prefix), dtype),
                           _values(v_enc[:, :cut], in_prefix, dtype))
            if divides:
                o, state = core(qh, kh, v1, packed0, enc, eps)
                o = o.to(v.dtype)
            else:
                o1, state = core(qh, kh, v1, packed0, enc)
                o = _divide(o1, eps).to(v.dtype)
        # float32 state for float32/bfloat16 inputs, float64 for float64 inputs (the compute dtype)
        return o, ((state[..., :-1], state[..., -1]) if output_final_state else None)

    return form


def _internal(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, H, X] -> [B, H, T, X]`` in ``dtype``."""
    return x.to(dtype).transpose(1, 2)


def _values(v: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, H, Dv] -> [B, H, T, Dv+1]``, contiguous in that layout (one pass: the chunked form then reads
    it without copying): ``[v, 1]`` with the rows of dropped positions set to zero (a select)."""
    vt = v.transpose(1, 2)
    v1 = torch.empty(*vt.shape[:-1], vt.shape[-1] + 1, dtype=dtype, device=v.device)
    v1[..., :-1].copy_(vt)
    v1[..., -1].fill_(1.0)
    if keep is None:
        return v1
    return torch.where(keep[:, None, :, None], v1, torch.zeros((), dtype=dtype, device=v.device))


def _divide(o1: torch.Tensor, eps: float) -> torch.Tensor:
    """``[B, H, T, Dv+1] -> [B, T, H, Dv]`` (contiguous): numerator over denominator."""
    o1 = o1.transpose(1, 2)
    den = o1[..., -1:] + eps
    if o1.requires_grad:
        return o1[..., :-1] / den
    out = torch.empty(o1.shape[:-1] + (o1.shape[-1] - 1,), dtype=o1.dtype, device=o1.device)
    return torch.div(o1[..., :-1], den, out=out)
