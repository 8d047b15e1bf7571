"""SVD-LLM (v1): Cholesky whitening, S = chol(X Xᵀ); W' = U_r Σ_r V_rᵀ S⁻¹.

Faithful to the reference including its failure mode: when Cholesky fails (X Xᵀ not positive
definite), it adds (−λ_min + 1e-6)·I and retries — the jitter puts its loss above the minimum.
"""
from __future__ import annotations

import logging

import torch

from .base import MatrixInput, Method, register
from .linalg import split_factors

log = logging.getLogger(__name__)


def cholesky_with_jitter(gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of gram, and the jitter that had to be added (0.0 if none)."""
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return factor, 0.0
    lam_min = float(torch.linalg.eigvalsh(gram).min())
    jitter = -lam_min + 1e-6
    factor, info = torch.linalg.cholesky_ex(gram + jitter * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"Cholesky failed even after a jitter of {jitter:.3g}")
    return factor, jitter


@register
class SVDLLM(Method):
    name = "svd-llm"

    def __init__(self, **_):
        pass

    def factorize(self, m: MatrixInput, rank: int):
        gram = m.stats.gram
        chol, jitter = cholesky_with_jitter((gram + gram.T) / 2)
        if jitter:
            log.info("%s: X Xᵀ is not positive definite; Cholesky needed a jitter of %.3g", m.name, jitter)
        u, s, vh = torch.linalg.svd(m.weight @ chol, full_matrices=False)
        up, down = split_factors(u, s, vh, rank)
        # down · S⁻¹ by a triangular solve: (S⁻ᵀ downᵀ)ᵀ
        down = torch.linalg.solve_triangular(chol.T, down.T, upper=True).T
        return up, down
