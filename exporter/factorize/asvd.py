"""ASVD (Yuan et al. 2023), activation-aware column scaling: S = diag(mean|x|^α) over the input
channels, SVD of W S, keep the top r, unscale: down ← down S⁻¹. α = 0.5 as in the paper.

Only the scaling is ASVD's; its sensitivity-based rank search is an allocation and not part of this
method. A channel that was exactly zero on every calibration token has scale 0; like SVD-LLM V2's
pseudo-inverse, its column of W' is 0 (nothing was observed there). ASVD4LLM replaces a layer whose SVD
fails with a random nn.Linear; here a failure is an error (compress_ raises).
"""
from __future__ import annotations

import torch

from .base import MatrixInput, Method, register
from .linalg import split_factors


def column_scaled_svd(weight: torch.Tensor, scale: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of W from the SVD of W·diag(scale), unscaled again (shared with FWSVD)."""
    scale = scale.to(torch.float64)
    if (scale < 0).any() or not torch.isfinite(scale).all():
        raise ValueError("column scales must be finite and non-negative")
    u, s, vh = torch.linalg.svd(weight.to(torch.float64) * scale, full_matrices=False)
    up, down = split_factors(u, s, vh, rank)
    # guard: scale 0 → inverse 0 (an unobserved channel), never a division by zero
    inv = torch.where(scale > 0, 1.0 / scale.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(scale))
    return up, down * inv


@register
class ASVD(Method):
    name = "asvd"
    needs = frozenset({"abs_mean"})

    def __init__(self, alpha: float = 0.5, **_):
        if alpha < 0:
            raise ValueError(f"ASVD alpha must be >= 0, got {alpha}")
        self.alpha = alpha

    def factorize(self, m: MatrixInput, rank: int):
        return column_scaled_svd(m.weight, m.stats.abs_mean.pow(self.alpha), rank)
