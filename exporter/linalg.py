"""Pure math on tensors: whitening, truncation, losses. All in float64.

Notation: W is out×in (nn.Linear layout), X is in×N, C = X Xᵀ (in×in).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Whitening:
    """C = U diag(s) Uᵀ; S = U diag(√s) is a square root of C (S Sᵀ = C) that exists for any PSD C."""
    basis: torch.Tensor  # U_s, in×in, orthonormal columns
    sqrt_eig: torch.Tensor  # √s, with s clamped at 0
    inv_sqrt_eig: torch.Tensor  # 1/√s where s is above the relative tolerance, else 0 (pseudo-inverse)


def whiten(gram: torch.Tensor, rtol: float | None = None) -> Whitening:
    """Eigendecomposition-based whitening (SVD-LLM V2): no positive-definiteness needed."""
    gram = gram.to(torch.float64)
    gram = (gram + gram.T) / 2  # symmetric up to summation rounding
    eig, basis = torch.linalg.eigh(gram)
    eig = eig.clamp_min(0.0)  # C is PSD: negative eigenvalues are rounding noise
    top = eig.max()
    if top <= 0:
        raise ValueError("X Xᵀ is zero: the calibration data never reached this layer")
    # Below this, an eigenvalue is indistinguishable from 0 in float64: treat its direction as unseen.
    tol = top * (rtol if rtol is not None else gram.shape[0] * torch.finfo(torch.float64).eps)
    sqrt_eig = eig.sqrt()
    inv = torch.where(eig > tol, 1.0 / sqrt_eig.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(eig))
    return Whitening(basis, sqrt_eig, inv)


@dataclass(frozen=True)
class WhitenedSVD:
    """SVD of D = W U_s √S_s. Its singular values are those of W X: the truncation-loss spectrum."""
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


def whitened_svd(weight: torch.Tensor, wh: Whitening) -> WhitenedSVD:
    d = (weight.to(torch.float64) @ wh.basis) * wh.sqrt_eig
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return WhitenedSVD(u, s, vh)


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` part of U diag(s) Vh as (up = U_r √s_r, down = √s_r Vh_r): balanced factor norms."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def min_truncation_loss(spectrum: torch.Tensor, rank: int) -> float:
    """√(Σ_{i>r} σ_i²): the smallest ‖WX − W'X‖_F any rank-r W' can reach (Eckart–Young on WX)."""
    return float(spectrum[rank:].to(torch.float64).square().sum().sqrt())


def truncation_loss(weight: torch.Tensor, approx: torch.Tensor, wh: Whitening) -> float:
    """‖(W − W')X‖_F from X Xᵀ alone, as ‖(W − W') U_s √S_s‖_F: the same PSD-clamped metric as the
    minimum. (tr(E C Eᵀ) on the raw sum can go negative: its rounding-noise negative eigenvalues, times
    W's components in never-excited directions, cancel a small true loss.)"""
    err = weight.to(torch.float64) - approx.to(torch.float64)
    return float(torch.linalg.norm((err @ wh.basis) * wh.sqrt_eig))
