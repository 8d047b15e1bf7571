"""AdaSVD's adaComp (paper §3.1): after the whitened truncation, alternately re-solve `up` and `down`
by least squares so that the compressed linear, fed X_c (its input propagated through the already
compressed earlier layers), reproduces the ORIGINAL output W X_o.

    f(up, down) = ‖up·down·X_c − W·X_o‖²_F
                = tr(W' C_c W'ᵀ) − 2 tr(W' Cross Wᵀ) + tr(W C_o Wᵀ),   W' = up·down,
    C_c = X_c X_cᵀ (stats.gram), Cross = X_c X_oᵀ (stats.cross), ‖W X_o‖² = tr(W C_o Wᵀ) (stats.target_energy).

Only these second moments are used (through their products with a few vectors: InputStats.moment_products,
from the tokens themselves while there are fewer of them than input features), so every calibration token
counts exactly — the paper's stack-of-batch (averaging samples into buckets so X fits in GPU memory) only
approximates this.

The two steps (pseudo-inverses of r×r matrices only):
    up   ← argmin_up ‖up·down·X_c − W X_t‖ = W Crossᵀ downᵀ (down C_c downᵀ)⁺              (eq. 8–10)
    down ← argmin_down ‖up·down·X_c − W X_t‖² + λ‖up·(down − down_prev)‖²                 (damped exact)
`--adacomp-iterations k` runs up, then (down, up) k − 1 times. Both are block minimisers (the down step of
f plus a proximal term that down_prev satisfies at zero cost), so f never increases. With X_c = X_o the
whitened truncation is already the global optimum and both steps leave it unchanged: adaComp only acts on
the drift. (The global optimum over rank-r W' is reduced-rank regression; tests use it as a lower bound.)
The paper's own down step (up⁺ W, eq. 13, data-free) undoes the whitening and lowered f on 2–4 of 210
SmolLM2 matrices, so iterations past 1 repeated the same up step; the undamped exact down step (a
regression on all `in` input channels) was far worse than SVD-LLM (perplexity 97858 vs 1316 at 60%),
fitting the weakly excited directions of X_c to noise. The damping λ = `damping`·tr(C_c)/n keeps those
directions where they were (the default `damping` 0.1 is not chosen on validation text: the down step runs
from the second iteration only, and the default is one).

Strength β: the target is W X_t with X_t = β X_o + (1 − β) X_c (Cross replaced by the blended moment).
β = 1 is the paper's; β = 0 keeps the whitened truncation. From the whitened truncation (the optimum for
β = 0) the first up step lands a fraction β of the way to the full least-squares update, so it is a damped
step, and the paper's f still falls. On SmolLM2 the full step (β = 1) lowers f the most and gives the
worst perplexity, worse than SVD-LLM. The default β = 0.25 was chosen at ratio 0.6 on wiki.test and leads
0.1, 0.5 and 1.0 on validation text at 0.4 too (docs/adasvd.md).
"""
from __future__ import annotations

import torch

from .base import MatrixInput, Method, register
from .linalg import symmetric
from .stats import ROWS, InputStats
from .svd_llm_v2 import SVDLLMV2


def target_energy(stats: InputStats, name: str) -> float:
    """‖W X_o‖²_F of the linear `name`: the constant of adaComp's objective (InputStats, `targets`)."""
    if name not in stats.target_energy:
        raise ValueError(f"adaComp needs ‖W X_o‖² of {name}: pass its weight as a target of the cross statistics")
    return stats.target_energy[name]


def products(w: torch.Tensor, down: torch.Tensor, stats: InputStats) -> tuple[torch.Tensor, ...]:
    """(C_c downᵀ, Crossᵀ downᵀ, W Crossᵀ downᵀ): the products with the two moments are the only n²-sized
    (or n·N-sized, through the tokens) work of an up step and of the objective, and the m×r one with W is
    shared by both (no n×n blend of the two moments is formed)."""
    gram_d, cross_d = stats.moment_products(down.T)
    return gram_d, cross_d, w @ cross_d


def objective(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, stats: InputStats, energy: float,
              prods: tuple[torch.Tensor, ...] | None = None) -> float:
    """‖up·down·X_c − W X_o‖_F (the paper's objective) from the second moments, with `energy` = ‖W X_o‖²:
        tr(W' C_c W'ᵀ) − 2 tr(W' Cross Wᵀ) + ‖W X_o‖²  =  Σ (upᵀup ⊙ down C_c downᵀ) − 2 Σ (up ⊙ W Crossᵀ downᵀ) + …
    `prods` = products(W, down, stats) when the caller already has them."""
    w, up, down = weight.to(torch.float64), up.to(torch.float64), down.to(torch.float64)
    gram_d, _, w_cross_d = prods if prods is not None else products(w, down, stats)
    value = ((up.T @ up) * (down @ gram_d)).sum() - 2 * torch.einsum("ij,ij->", up, w_cross_d) + energy
    return float(value.clamp_min(0.0).sqrt())  # ≥ 0 mathematically; a tiny negative is cancellation


def adacomp_loss(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, stats: InputStats, name: str) -> float:
    """The paper's objective ‖up·down·X_c − W X_o‖_F for the linear `name`."""
    return objective(weight, up, down, stats, target_energy(stats, name))


def rebalance(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same product up·down, factors re-split as U√Σ, √ΣVᵀ (the least-squares steps unbalance their
    norms, which matters once the factors are stored in float16)."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    root = s.sqrt()  # all r components are kept: scaled in place (split_factors' balanced split, no copies)
    right = (vh @ q_down.T).mul_(root[:, None])
    del q_down
    for rows in torch.split(q_up, ROWS):  # left = Q_up u, written over Q_up: no second m×r matrix
        rows.copy_(rows @ u)
    return q_up.mul_(root), right


def _pinv_psd(gram: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of a small symmetric PSD matrix (r×r), directions below float64 noise dropped."""
    return torch.linalg.pinv(symmetric(gram), hermitian=True, rtol=gram.shape[0] * torch.finfo(torch.float64).eps)


def up_step(w: torch.Tensor, down: torch.Tensor, prods: tuple[torch.Tensor, ...], strength: float) -> torch.Tensor:
    """argmin_up ‖up·down·X_c − W X_t‖ = W Crossₜᵀ downᵀ (down C_c downᵀ)⁺, Crossₜ = (1 − β) C_c + β Cross:
    r×r work on `prods` = products(W, down, stats), no n×n factorization. The moments are blended on the n×r
    side, so one product with W is formed."""
    gram_d, cross_d, _ = prods
    # W (L P⁺), not (W L) P⁺: the r×r factor is applied on the n×r side, so one m×r matrix is formed, not two
    return w @ (torch.lerp(gram_d, cross_d, strength) @ _pinv_psd(down @ gram_d))


def down_step(w: torch.Tensor, up: torch.Tensor, down: torch.Tensor, stats: InputStats, strength: float,
              damping: float) -> torch.Tensor:
    """The exact least-squares down step, damped towards the current `down`:
        argmin_down ‖up·down·X_c − W X_t‖² + λ‖up·(down − down_prev)‖²,   λ = damping · tr(C_c)/n
      = [(upᵀup)⁻¹ upᵀ W Crossₜᵀ + λ down_prev] (C_c + λ I)⁻¹.
    Directions X_c excites much more than λ get the regression, the others keep what they had: the undamped
    step (a regression on all n input channels) fits the weakly excited ones to noise (docs/adasvd.md).
    Since down_prev is feasible, f never increases. (C_c + λI)⁻¹: InputStats.solve_damped."""
    lam = damping * stats.trace / stats.dim
    if lam <= 0:
        raise ValueError("adaComp's down step needs damping > 0 and a non-zero X_c X_cᵀ")
    coef = torch.linalg.solve(symmetric(up.T @ up), up.T @ w)  # r×n
    gram_c, cross_c = stats.moment_products(coef.T, transpose_cross=False)  # C_c coefᵀ, Cross coefᵀ
    rhs = torch.lerp(gram_c, cross_c, strength).T + lam * down  # coef·Crossₜᵀ + λ down, blended as in up_step
    return stats.solve_damped(rhs, lam)


def adacomp(weight: torch.Tensor, start: list[torch.Tensor], stats: InputStats,
            iterations: int, strength: float = 1.0, taken: list[str] | None = None,
            damping: float = 0.1, energy: float | None = None,
            objective_values: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`iterations` up steps towards the target W·X_t, X_t = β X_o + (1 − β) X_c, β = `strength`, with a damped
    exact down step between two of them (up, then (down, up) per further iteration); see the module docstring.
    `start` = [up, down], the factors to start from; the list is emptied, so that once the first up step has
    replaced the starting up (m×r) nothing holds it.
    Every step is a block minimiser of f (the down step of f plus a proximal term), so f never increases.
    The steps taken are appended to `taken`; with `energy` = ‖W X_o‖², f before and after to `objective_values`
    (from the products the steps compute anyway: the objective then costs m·r², not m·n²)."""
    if not stats.has_cross:
        raise ValueError("adaComp needs the cross statistics X_c X_oᵀ (propagate through the compressed layers)")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"adaComp strength must be in [0, 1], got {strength}")
    if objective_values is not None and energy is None:
        raise ValueError("the objective needs energy = ‖W X_o‖²")
    w = weight.to(torch.float64)
    up, down = start
    start.clear()
    if iterations == 0 or strength == 0.0:  # nothing moves
        if objective_values is not None:
            objective_values += [objective(w, up, down, stats, energy)] * 2
        return up, down
    prods = products(w, down, stats)
    if objective_values is not None:
        objective_values.append(objective(w, up, down, stats, energy, prods))
    for i in range(iterations):
        if i > 0:
            down = down_step(w, up, down, stats, strength, damping)
            prods = products(w, down, stats)
            if taken is not None:
                taken.append("down")
        up = up_step(w, down, prods, strength)
        if taken is not None:
            taken.append("up")
    if objective_values is not None:
        objective_values.append(objective(w, up, down, stats, energy, prods))
    del prods  # an m×r product: not held through the rebalance
    return rebalance(up, down)


@register
class AdaSVD(Method):
    name = "adasvd"
    needs = frozenset({"cross"})

    def __init__(self, iterations: int = 1, strength: float = 0.25, damping: float = 0.1, **_):
        if iterations < 0:
            raise ValueError(f"--adacomp-iterations must be >= 0, got {iterations}")
        if not damping > 0:
            raise ValueError(f"--adacomp-damping must be > 0, got {damping}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"--adacomp-strength must be in [0, 1], got {strength}")
        self.iterations, self.strength, self.damping = iterations, strength, damping
        self._losses: dict[str, tuple[float, float, int]] = {}

    def factorize(self, m: MatrixInput, rank: int):
        start = list(SVDLLMV2().factorize(m, rank))  # whitened truncation on the propagated input X_c
        taken: list[str] = []
        values: list[float] = []
        up, down = adacomp(m.weight, start, m.stats, self.iterations, self.strength, taken, self.damping,
                           target_energy(m.stats, m.name), values)
        self._losses[m.name] = (values[0], values[1], taken.count("down"))
        return up, down

    def report(self, name, m, up, down, extra):
        before, after, down_steps = self._losses.pop(name)
        extra.setdefault("adacomp", {})[name] = {"iterations": self.iterations, "strength": self.strength,
                                                 "damping": self.damping,
                                                 "loss_before": before, "loss_after": after,
                                                 "down_steps": down_steps}
