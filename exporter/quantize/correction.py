"""Low rank as a correction of the grid's error (--correction-rank r): W ≈ Q(W) + up·down.

Once GPTQ has put a dense linear on the grid, its residual R = W − Q(W) is truncated the SVD-LLM V2 way: the
rank-r R' minimising ‖(R − R')X‖_F, i.e. R' = P_r P_rᵀ R with P_r the top-r eigenvectors of R X Xᵀ Rᵀ
(factorize/linalg.py: Eckart–Young on RX, no inverse of X Xᵀ, so a singular X Xᵀ is no obstacle). Its loss is
the theoretical minimum √Σ_{i>r} σ_i(RX)² (tests/test_correction.py). The pair stays float in the graph (two
MatMuls beside the MatMulNBits node): on SmolLM2 a rank-4 correction of every decoder linear at block 64 beat
block 32 (more scales) for fewer bytes, in PyTorch (docs/results/int4-correction.md) and through ONNX Runtime
(docs/results/front.md: 83.4 MB, validation 22.69, against 86.6 MB, 24.18).

Only the top r eigenvectors are needed, and at 7B R X Xᵀ Rᵀ is 11008 × 11008 (gate/up): its full
eigendecomposition took minutes per matrix on one core. They come from subspace iteration on the product
R (X Xᵀ (Rᵀ Q)) instead (never formed), run until the energy it captures stops growing (by 1e-12):
O(out·in·k + in²·k) per step for k = r + 8 vectors, and the same optimum (tests/test_correction.py).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..factorize.linalg import descending_eigh, truncation_loss
from ..model.corrected import CorrectedLinear
from ..model.lowrank import LowRankLinear, swap_module

log = logging.getLogger(__name__)
OVERSAMPLE = 8  # subspace vectors beyond the rank: the iteration converges at (λ_{r+8+1} / λ_r)^steps
MAX_STEPS = 500


def top_eigenvectors(residual: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the top-`rank` eigenvalues of M = R C Rᵀ, descending; their eigenvectors, out×rank, orthonormal) by
    subspace iteration on M·Q = R (C (Rᵀ Q)), M never formed. Stops when the energy the top `rank` Ritz
    values capture (a lower bound of the true sum, rising to it) gains less than 1e-12 of it."""
    out = residual.shape[0]
    k = min(out, rank + OVERSAMPLE)

    def product(q: torch.Tensor) -> torch.Tensor:
        return residual @ (gram @ (residual.T @ q))
    start = torch.randn(out, k, dtype=residual.dtype, generator=torch.Generator().manual_seed(0))
    basis = torch.linalg.qr(start.to(residual.device))[0]
    captured = -1.0
    for _ in range(MAX_STEPS):
        image = product(basis)
        values, vectors = descending_eigh((basis.T @ image + image.T @ basis) / 2)  # Rayleigh–Ritz
        gained, captured = float(values[:rank].sum()) - captured, float(values[:rank].sum())
        if k == out or gained <= 1e-12 * max(captured, 1e-300):  # guard: a zero residual captures 0
            break
        basis = torch.linalg.qr(image)[0]
    else:  # still a valid correction, short of the optimum by less than the last step's gain: said, not hidden
        log.warning("the rank-%d correction's subspace iteration stopped after %d steps, its captured energy "
                    "still rising by %.1e of it", rank, MAX_STEPS, gained / max(captured, 1e-300))
    return values[:rank], basis @ vectors[:, :rank]


def residual_correction(residual: torch.Tensor, gram: torch.Tensor, rank: int,
                        weighted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(up, down, ‖RX‖, the least ‖(R − R')X‖ of any rank-r R'): the loss-optimal rank-r part up·down of
    `residual` R (out×in, float64) under X Xᵀ = `gram`, up (out×r) with orthonormal columns, down = upᵀR
    (r×in). The least loss is √(‖RX‖² − Σ_{i≤r} λ_i(R X Xᵀ Rᵀ)) (Eckart–Young on RX). `weighted`: R·C
    (out·in² multiply-adds, as many as GPTQ's own pass: computed once by the caller, which needs it too)."""
    values, up = top_eigenvectors(residual, gram, rank)
    energy = float((weighted * residual).sum().clamp_min(0.0))  # tr(R C Rᵀ) = ‖RX‖²
    return up, up.T @ residual, energy ** 0.5, max(energy - float(values.sum()), 0.0) ** 0.5


def correct_linear_(layer: nn.Module, path: str, dense: torch.Tensor, gram: torch.Tensor, rank: int) -> dict:
    """Swap the quantized nn.Linear at `path` for a CorrectedLinear: its grid weight, plus the rank-r correction
    of its residual to `dense` (the weight before quantization, out×in), in the linear's dtype. -> its record:
    ‖(W − Q)X‖ before, ‖(W − Q − up·down)X‖ with the factors as stored, and the minimum any rank-r pair reaches."""
    base = layer.get_submodule(path)
    rank = min(rank, *base.weight.shape)
    gram = gram.to(base.weight.device, torch.float64)
    residual = dense.to(torch.float64) - base.weight.detach().to(torch.float64)
    weighted = residual @ gram  # once, for the energy and for the loss as stored
    up, down, loss_before, loss_min = residual_correction(residual, gram, rank, weighted)
    correction = LowRankLinear.from_factors(up, down, None, dtype=base.weight.dtype, device=base.weight.device)
    if not (torch.isfinite(correction.up.weight).all() and torch.isfinite(correction.down.weight).all()):
        raise FloatingPointError(f"the rank-{rank} correction of {path} is not finite in {base.weight.dtype}")
    swap_module(layer, path, CorrectedLinear(base, correction))
    return {"rank": rank, "loss_before": loss_before,
            "loss": truncation_loss(residual, correction.up.weight.detach(), correction.down.weight.detach(), gram,
                                    weighted),
            "loss_min": loss_min}
