"""Pure math on tensors: whitening, the truncation-loss spectrum, the loss-optimal truncation, losses.

Notation: W is out×in = m×n (nn.Linear layout), X is n×N, C = X Xᵀ (n×n), float64 unless a caller says
otherwise.

The loss-optimal rank-r W' (SVD-LLM V2's Thm 3.1) minimises ‖WX − W'X‖_F. By Eckart–Young on WX its value
is √Σ_{i>r} σ_i(WX)², reached by W' = P_r P_rᵀ W, P_r the top-r left singular vectors of WX, i.e. the
top-r eigenvectors of (WX)(WX)ᵀ = W C Wᵀ. The paper computes the same product through C = U S Uᵀ and an SVD
of W U √S (an n×n eigendecomposition plus an m×n SVD); the eigenvectors of W C Wᵀ need only one
min(m, n)-sized eigendecomposition, which is what makes a 7B layer (n = 16384 for OPT's fc2) take seconds
instead of minutes. Both give the same W' wherever X was observed; in directions X never excited (C
singular) the paper's pseudo-inverse maps to 0, while P_r P_rᵀ W keeps W's projected action — never
further from W, with the same (minimal) loss on the calibration data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Whitening:
    """C = U diag(s) Uᵀ; S = U diag(√s) is a square root of C (S Sᵀ = C) that exists for any PSD C."""
    basis: torch.Tensor  # U_s, n×n, orthonormal columns
    sqrt_eig: torch.Tensor  # √s, with s clamped at 0
    inv_sqrt_eig: torch.Tensor  # 1/√s where s is above the relative tolerance, else 0 (pseudo-inverse)


def symmetric(gram: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    gram = gram.to(dtype)
    return (gram + gram.T) / 2  # symmetric up to summation rounding


def whiten(gram: torch.Tensor, rtol: float | None = None) -> Whitening:
    """Eigendecomposition-based square root of C (no positive-definiteness needed)."""
    eig, basis = torch.linalg.eigh(symmetric(gram))
    eig = eig.clamp_min(0.0)  # C is PSD: negative eigenvalues are rounding noise
    top = eig.max()
    if top <= 0:
        raise ValueError("X Xᵀ is zero: the calibration data never reached this layer")
    # Below this, an eigenvalue is indistinguishable from 0 in float64: treat its direction as unseen.
    tol = top * (rtol if rtol is not None else gram.shape[0] * torch.finfo(torch.float64).eps)
    sqrt_eig = eig.sqrt()
    inv = torch.where(eig > tol, 1.0 / sqrt_eig.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(eig))
    return Whitening(basis, sqrt_eig, inv)


def output_gram(weight: torch.Tensor, gram: torch.Tensor, weight_gram: torch.Tensor | None = None) -> torch.Tensor:
    """W C Wᵀ = (WX)(WX)ᵀ, m×m, symmetrised; `weight_gram` = W·C when the caller already has it."""
    w = weight.to(gram.dtype)
    return symmetric((weight_gram if weight_gram is not None else w @ gram) @ w.T, gram.dtype)


def descending_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a PSD Gram by decreasing value (negative rounding noise clamped to 0)."""
    values, vectors = torch.linalg.eigh(gram)
    return values.flip(0).clamp_min(0.0), vectors.flip(1)


def descending_eigvalsh(gram: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` part of U diag(s) Vh as (up = U_r √s_r, down = √s_r Vh_r): balanced factor norms."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def min_truncation_loss(spectrum: torch.Tensor, rank: int) -> float:
    """√(Σ_{i>r} σ_i²): the smallest ‖WX − W'X‖_F any rank-r W' can reach (Eckart–Young on WX)."""
    return float(spectrum[rank:].to(torch.float64).square().sum().sqrt())


def truncation_loss(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, gram: torch.Tensor,
                    weight_gram: torch.Tensor | None = None) -> float:
    """‖WX − up·down·X‖_F from C = X Xᵀ alone, for factors of any precision (pass them as stored).

    Expanded as tr(W C Wᵀ) − 2 tr(W' C Wᵀ) + tr(W' C W'ᵀ), W' = up·down, every term with the same raw C, so
    that a W' equal to W gives exactly 0; `weight_gram` = W·C (m×n) when the caller already has it. In
    float64 the cancellation is harmless for any loss above ~1e-7 of ‖WX‖; rounding can still leave a hair
    below 0 at a zero loss: clamped."""
    dt = gram.dtype
    w, u, d = weight.to(dt), up.to(dt), down.to(dt)
    wc = weight_gram if weight_gram is not None else w @ gram
    energy = (wc * w).sum()  # tr(W C Wᵀ)
    cross = (u * (wc @ d.T)).sum()  # tr(W' C Wᵀ)
    inner = ((u.T @ u) * ((d @ gram) @ d.T)).sum()  # tr(W' C W'ᵀ)
    return float((energy - 2 * cross + inner).clamp_min(0.0).sqrt())
