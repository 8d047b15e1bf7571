"""GPTQ (Frantar et al., 2023) on the MatMulNBits grid.

Rounding W (out×in) to Q minimises, per output row, ‖(W − Q) X‖² = (w − q)ᵀ H (w − q) with H = X Xᵀ. GPTQ rounds
one input column at a time and moves the rounding error of column j onto the columns not yet rounded, by
the j-th row of the upper Cholesky factor of H⁻¹ (the optimal update of the remaining weights given the
rounded ones, the Optimal Brain Surgeon step). A block's scale is set when its first column comes up, from
the weights as the earlier updates left them, so scales and codes are exactly the grid the graph stores.
"""
from __future__ import annotations

import torch

from ..config import Quantization
from .grid import codes_of, scales_of, searched_scales, values_of

DAMPING = 0.01  # added to H's diagonal, relative to its mean: GPTQ's default, keeps the Cholesky factor defined
# The block scales the layer loop searches: ORT's own (the block's largest magnitude on the grid's end) and 8
# shrinks of it down to 0.8 (tests/test_quantize.py: ‖(W − Q)X‖² over 10% lower on Gaussian weights with skewed
# inputs); on SmolLM2 the GPTQ rows with and without it: docs/results/front.md.
SHRINKS = tuple(1.0 - 0.025 * i for i in range(9))


def inverse_cholesky(hessian: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹. Inputs never excited (a zero diagonal entry) get
    a unit diagonal: their columns are rounded without moving any error (they are never multiplied by a
    calibration input). A Hessian with a zero trace is an error: nothing was observed."""
    h = (hessian.to(torch.float64) + hessian.to(torch.float64).T) / 2
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    mean = torch.diagonal(h).mean()
    if not mean > 0:
        raise ValueError("GPTQ needs a Hessian X Xᵀ with a positive trace: this input was never observed")
    h += damping * mean * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, q: Quantization, scale_dtype: torch.dtype,
         damping: float = DAMPING, shrinks: tuple[float, ...] = (1.0,)) -> tuple[torch.Tensor, torch.Tensor]:
    """(values on the grid, scales [out, blocks]) of `weight` (out×in), in float64. The blocks of the grid are
    also GPTQ's lazy-update blocks: the error of a block reaches the later columns in one matrix product.
    `shrinks`: the block scales searched (grid.searched_scales, weighted by diag H); (1.0,): ORT's own rule."""
    w = weight.to(torch.float64).clone()
    u = inverse_cholesky(hessian, damping)
    importance = torch.diagonal(hessian).to(torch.float64)
    in_features, size = w.shape[1], q.block_size
    values, scales = torch.empty_like(w), []
    for start in range(0, in_features, size):
        end = min(start + size, in_features)
        block = w[:, start:end]  # a view: updated in place column by column
        scale = (scales_of(block, q, scale_dtype) if shrinks == (1.0,) else
                 searched_scales(block, q, scale_dtype, importance[start:end], shrinks))
        errors = torch.empty_like(block)
        for j in range(end - start):
            column = block[:, j:j + 1]
            rounded = values_of(codes_of(column, scale, q), scale, q)
            errors[:, j:j + 1] = (column - rounded) / u[start + j, start + j]
            block[:, j:] -= errors[:, j:j + 1] * u[start + j, start + j:end][None, :]
            values[:, start + j:start + j + 1] = rounded
        w[:, end:] -= errors @ u[start:end, end:]
        scales.append(scale)
    return values, torch.stack(scales, dim=1)


def weighted_error(weight: torch.Tensor, values: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖(W − Q) X‖²_F = tr((W − Q) H (W − Q)ᵀ): what GPTQ minimises."""
    d = (weight - values).to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", d, hessian.to(torch.float64), d))
