"""AdaSVD's adaComp (paper §3.1): after the whitened truncation, alternately re-solve `up` and `down`
by least squares so that the compressed linear, fed X_c (its input propagated through the already
compressed earlier layers), reproduces the ORIGINAL output W X_o.

    f(up, down) = ‖up·down·X_c − W·X_o‖²_F
                = tr(W' C_c W'ᵀ) − 2 tr(W' Cross Wᵀ) + tr(W C_o Wᵀ),   W' = up·down,
    C_c = X_c X_cᵀ (stats.gram), Cross = X_c X_oᵀ (stats.cross), C_o = X_o X_oᵀ (stats.gram_orig).

Only these second moments are used, so every calibration token counts exactly and no activation is
stored — the paper's stack-of-batch (averaging samples into buckets so X fits in GPU memory) only
approximates this.

The two steps, pseudo-inverses by SVD as in the paper (S a square root of C_c, S Sᵀ = C_c):
    up   ← argmin_up ‖up·down·X_c − W X_o‖  = W Crossᵀ downᵀ (down C_c downᵀ)⁺   (eq. 8–10)
    down ← up⁺ W                                                              (eq. 13, data-free)
The up step is an exact block minimiser; the paper's down step is not, so a step that would raise f is
rejected (f never increases). With X_c = X_o the whitened truncation is already the global optimum and
both steps leave it unchanged: adaComp only acts on the drift. (The global optimum over rank-r W' is
reduced-rank regression; tests use it as a lower bound.)

Strength β: the target is W X_t with X_t = β X_o + (1 − β) X_c (Cross and C_o replaced by the blended
moments). β = 1 is the paper's; β = 0 keeps the whitened truncation. From the whitened truncation (the
optimum for β = 0) the first up step lands a fraction β of the way to the full least-squares update, so it
is a damped step, and the paper's f still falls. On SmolLM2 at 60% the full step (β = 1) lowers f the
most and gives the worst perplexity, worse than SVD-LLM; β = 0.25 is the default, chosen by the
measurement in docs/adasvd.md. An exact down step (a regression on all `in` input channels) was tried
first and was far worse (perplexity 97858 vs SVD-LLM's 1316 at 60%), most likely overfitting the
low-variance directions of X_c with 4096 calibration tokens.
"""
from __future__ import annotations

import torch

from ..calibration.stats import InputStats
from ..linalg import split_factors
from .base import MatrixInput, Method, register
from .svd_llm_v2 import SVDLLMV2


def adacomp_loss(weight: torch.Tensor, approx: torch.Tensor, stats: InputStats) -> float:
    """‖W' X_c − W X_o‖_F (the paper's objective) from the second moments alone."""
    return _loss(weight, approx, stats.gram, stats.cross, stats.gram_orig)


def _loss(weight, approx, gram, cross, target_gram) -> float:
    """‖W' X_c − W X_t‖_F with X_c X_cᵀ = gram, X_c X_tᵀ = cross, X_t X_tᵀ = target_gram."""
    w, a = weight.to(torch.float64), approx.to(torch.float64)
    value = ((a @ gram) * a).sum() - 2 * ((a @ cross) * w).sum() + ((w @ target_gram) * w).sum()
    return float(value.clamp_min(0.0).sqrt())  # ≥ 0 mathematically; a tiny negative is cancellation


def rebalance(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same product up·down, factors re-split as U√Σ, √ΣVᵀ (the least-squares steps unbalance their
    norms, which matters once the factors are stored in float16)."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return split_factors(q_up @ u, s, vh @ q_down.T, up.shape[1])


def adacomp(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, stats: InputStats,
            iterations: int, strength: float = 1.0, taken: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`iterations` rounds of (up step, down step) towards the target W·X_t, X_t = β X_o + (1 − β) X_c,
    β = `strength`; see the module docstring. The steps that were kept are appended to `taken`."""
    if stats.cross is None:
        raise ValueError("adaComp needs the cross statistics X_c X_oᵀ (propagate through the compressed layers)")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"adaComp strength must be in [0, 1], got {strength}")
    if iterations == 0 or strength == 0.0:
        return up, down
    w = weight.to(torch.float64)
    gram, b = stats.gram, strength
    cross = (1 - b) * gram + b * stats.cross  # X_c X_tᵀ
    target_gram = (1 - b) ** 2 * gram + b * (1 - b) * (stats.cross + stats.cross.T) + b ** 2 * stats.gram_orig
    wh = stats.whitening
    root = wh.basis * wh.sqrt_eig  # S, S Sᵀ = C_c
    # W X_t X_cᵀ S⁺ᵀ: with down·S = D, the up step is (W X_t X_cᵀ S⁺ᵀ)·D⁺
    target_root = (w @ cross.T @ wh.basis) * wh.inv_sqrt_eig
    observed = (wh.basis * (wh.inv_sqrt_eig > 0)) @ wh.basis.T  # projector on the directions X_c reached
    w_observed = w @ observed
    loss = _loss(w, up @ down, gram, cross, target_gram)
    for _ in range(iterations):
        for step in ("up", "down"):
            if step == "up":
                new_up, new_down = target_root @ torch.linalg.pinv(down @ root), down
            else:
                new_up, new_down = up, torch.linalg.pinv(up) @ w_observed
            new_loss = _loss(w, new_up @ new_down, gram, cross, target_gram)
            if new_loss <= loss:  # the down step is not a minimiser of f: keep only what helps
                up, down, loss = new_up, new_down, new_loss
                if taken is not None:
                    taken.append(step)
    return rebalance(up, down)


@register
class AdaSVD(Method):
    name = "adasvd"
    needs = frozenset({"cross"})

    def __init__(self, iterations: int = 1, strength: float = 0.25, **_):
        if iterations < 0:
            raise ValueError(f"--adacomp-iterations must be >= 0, got {iterations}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"--adacomp-strength must be in [0, 1], got {strength}")
        self.iterations, self.strength = iterations, strength
        self._losses: dict[str, tuple[float, float, int]] = {}

    def factorize(self, m: MatrixInput, rank: int):
        up, down = SVDLLMV2().factorize(m, rank)  # whitened truncation on the propagated input X_c
        before = adacomp_loss(m.weight, up @ down, m.stats)
        taken: list[str] = []
        up, down = adacomp(m.weight, up, down, m.stats, self.iterations, self.strength, taken)
        self._losses[m.name] = (before, adacomp_loss(m.weight, up @ down, m.stats), taken.count("down"))
        return up, down

    def report(self, name, m, up, down, extra):
        before, after, down_steps = self._losses.pop(name)
        extra.setdefault("adacomp", {})[name] = {"iterations": self.iterations, "strength": self.strength,
                                                 "loss_before": before, "loss_after": after,
                                                 "down_steps_kept": down_steps}
