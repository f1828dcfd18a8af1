"""The Taylor feature map of Based / JRT-RNN.

``phi(x) = [1, x / F**(1/4), vec(x x^T) / (sqrt(2) * sqrt(F))]`` so that
``phi(q) . phi(k) = 1 + s + s**2 / 2`` with ``s = q . k / sqrt(F)`` (second-order Taylor expansion of
``exp(s)``). The compressed map keeps only the upper triangle of ``x x^T`` (off-diagonal terms scaled by
``sqrt(2)``) and gives the same dot products with a smaller dimension. It is the one compressed space of
the package: :func:`compress_state` / :func:`expand_state` move states between the two spaces, and the chunked
operator form keeps its running state in it (see :mod:`jrt.ops.based.chunk`).
"""

from __future__ import annotations

import functools
import math

import torch


def feature_dim(f: int, compressed: bool = False) -> int:
    """Output dimension D of the map for input dimension ``f``: ``1+f+f^2`` or ``1+f+f(f+1)/2``."""
    return 1 + f + (f * (f + 1) // 2 if compressed else f * f)


@functools.lru_cache(maxsize=32)
def _triu_indices(f: int) -> tuple[torch.Tensor, torch.Tensor]:
    # cached: made outside inference mode, so that autograd may save them even when the first call is inside it
    with torch.inference_mode(False):
        rows, cols = torch.triu_indices(f, f)
    return rows, cols


def _diag_weights(
    rows: torch.Tensor, cols: torch.Tensor, diag: float, off: float, dtype: torch.dtype
) -> torch.Tensor:
    """Per upper-triangle entry: ``diag`` on the diagonal, ``off`` elsewhere (exact in ``dtype``)."""
    weights = torch.full(rows.shape, off, dtype=dtype, device=rows.device)
    weights[rows == cols] = diag
    return weights


def monomials(x: torch.Tensor) -> torch.Tensor:
    """``[..., F] -> [..., 1+F+F(F+1)/2]``: ``[1, x_a, x_a x_b (a <= b)]`` unscaled, the upper triangle in
    row-major order (the order of ``torch.triu_indices``)."""
    f = x.shape[-1]
    return torch.cat([torch.ones_like(x[..., :1]), x] + [x[..., a : a + 1] * x[..., a:] for a in range(f)], dim=-1)


def monomial_weights(f: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``[1+F+F(F+1)/2]``: the row scales ``w`` of the compressed map, ``phi_c(x) = w * monomials(x)``:
    ``1``, ``F**-1/4`` on the linear rows, ``1 / (sqrt(2) sqrt(F))`` on the squares ``x_a^2`` and ``1 / sqrt(F)``
    on the products ``x_a x_b`` (``a < b``, which stand for both ``(a, b)`` and ``(b, a)`` of the full map)."""
    rows, cols = _triu_indices(f)
    quad = _diag_weights(rows, cols, 1.0 / math.sqrt(2.0), 1.0, torch.float64) / math.sqrt(f)
    head = torch.tensor([1.0] + [f**-0.25] * f, dtype=torch.float64)
    return torch.cat([head, quad]).to(dtype=dtype, device=device)


def taylor_feature_map(x: torch.Tensor, compressed: bool = False) -> torch.Tensor:
    """Apply the Taylor feature map on the last dimension.

    Args:
        x: ``[..., F]`` queries or keys (raw projections).
        compressed: use the upper-triangle form (``D = 1+F+F(F+1)/2``) instead of the full outer product
            (``D = 1+F+F^2``).

    Returns:
        ``[..., D]`` in ``x``'s dtype.
    """
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(f"taylor_feature_map expects a floating-point tensor, got {getattr(x, 'dtype', x)}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"taylor_feature_map expects a tensor [..., F] with F >= 1, got {tuple(x.shape)}")
    f = x.shape[-1]
    if compressed:
        return monomials(x) * monomial_weights(f, x.dtype, x.device)
    linear = x * (f**-0.25)
    quad = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (math.sqrt(2.0) * math.sqrt(f))
    ones = torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
    return torch.cat([ones, linear, quad], dim=-1)


def taylor_kernel(s: torch.Tensor) -> torch.Tensor:
    """``1 + s + s^2/2``: the kernel the feature map computes, applied to scaled dot products ``s``."""
    return 1.0 + s + 0.5 * s * s


def compress_state(state: torch.Tensor, f: int) -> torch.Tensor:
    """Map a state in the full feature space ``[..., 1+f+f^2, X]`` to the compressed one ``[..., 1+f+f(f+1)/2, X]``.

    The map preserves ``phi_full(q) . S_full == phi_compressed(q) . S_compressed`` for every ``q``.
    """
    rows, cols = _triu_indices(f)
    rows, cols = rows.to(state.device), cols.to(state.device)
    head, quad = state[..., : 1 + f, :], state[..., 1 + f :, :]
    quad = quad.unflatten(-2, (f, f))
    sym = quad[..., rows, cols, :] + quad[..., cols, rows, :]
    scale = _diag_weights(rows, cols, 0.5, 1.0 / math.sqrt(2.0), state.dtype).unsqueeze(-1)
    return torch.cat([head, sym * scale], dim=-2)


def expand_state(state: torch.Tensor, f: int) -> torch.Tensor:
    """Inverse of :func:`compress_state`: a compressed state ``[..., 1+f+f(f+1)/2, X]`` to the full form."""
    rows, cols = _triu_indices(f)
    rows, cols = rows.to(state.device), cols.to(state.device)
    head, tri = state[..., : 1 + f, :], state[..., 1 + f :, :]
    scale = _diag_weights(rows, cols, 1.0, 1.0 / math.sqrt(2.0), state.dtype).unsqueeze(-1)
    tri = tri * scale
    quad = state.new_zeros(*state.shape[:-2], f, f, state.shape[-1])
    quad[..., rows, cols, :] = tri
    quad[..., cols, rows, :] = tri
    return torch.cat([head, quad.flatten(-3, -2)], dim=-2)
