"""Low rank as a correction of the grid's error (--correction-rank r): W ≈ Q(W) + up·down.

Once GPTQ has put a dense linear on the grid, its residual R = W − Q(W) is truncated the SVD-LLM V2 way: the
rank-r R' minimising ‖(R − R')X‖_F, i.e. R' = P_r P_rᵀ R with P_r the top-r eigenvectors of R X Xᵀ Rᵀ
(factorize/linalg.py: Eckart–Young on RX, no inverse of X Xᵀ, so a singular X Xᵀ is no obstacle). Its loss is
the theoretical minimum √Σ_{i>r} σ_i(RX)² (tests/test_correction.py). The pair stays float in the graph (two
MatMuls beside the MatMulNBits node): on SmolLM2 a rank-4 correction of every decoder linear at block 64 beat
block 32 (more scales) for fewer bytes, in PyTorch (docs/results/int4-correction.md) and through ONNX Runtime
(docs/results/front.md: 83.4 MB, validation 22.69, against 86.6 MB, 24.18).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..factorize.linalg import descending_eigh, min_truncation_loss, output_gram, truncation_loss
from ..model.corrected import CorrectedLinear
from ..model.lowrank import LowRankLinear, swap_module


def residual_correction(residual: torch.Tensor, gram: torch.Tensor,
                        rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(up, down, σ(RX)): the loss-optimal rank-r part up·down of `residual` R (out×in, float64) under
    X Xᵀ = `gram`, up (out×r) with orthonormal columns, down = upᵀR (r×in); and RX's singular values, descending."""
    values, vectors = descending_eigh(output_gram(residual, gram))
    up = vectors[:, :rank]
    return up, up.T @ residual, values.sqrt()


def correct_linear_(layer: nn.Module, path: str, dense: torch.Tensor, gram: torch.Tensor, rank: int) -> dict:
    """Swap the quantized nn.Linear at `path` for a CorrectedLinear: its grid weight, plus the rank-r correction
    of its residual to `dense` (the weight before quantization, out×in), in the linear's dtype. -> its record:
    ‖(W − Q)X‖ before, ‖(W − Q − up·down)X‖ with the factors as stored, and the minimum any rank-r pair reaches."""
    base = layer.get_submodule(path)
    rank = min(rank, *base.weight.shape)
    gram = gram.to(base.weight.device, torch.float64)
    residual = dense.to(torch.float64) - base.weight.detach().to(torch.float64)
    up, down, spectrum = residual_correction(residual, gram, rank)
    correction = LowRankLinear.from_factors(up, down, None, dtype=base.weight.dtype, device=base.weight.device)
    if not (torch.isfinite(correction.up.weight).all() and torch.isfinite(correction.down.weight).all()):
        raise FloatingPointError(f"the rank-{rank} correction of {path} is not finite in {base.weight.dtype}")
    swap_module(layer, path, CorrectedLinear(base, correction))
    return {"rank": rank, "loss_before": min_truncation_loss(spectrum, 0),
            "loss": truncation_loss(residual, correction.up.weight.detach(), correction.down.weight.detach(), gram),
            "loss_min": min_truncation_loss(spectrum, rank)}
