"""Ratio ↔ rank arithmetic and the rank allocations. A rank plan is plain data: {module name: rank}.

"ratio 0.4" removes 40% of the parameters of the compressed linears: kept fraction k = 1 − ratio,
rank r = floor(k·m·n/(m+n)); a pair stores r·(m+n) parameters and only saves any while
r < m·n/(m+n) (break-even). A matrix whose rank would not save parameters stays dense (absent from
the plan). Every allocation keeps Σ r_i (m_i + n_i) ≤ k · Σ m_i n_i.

An allocation is a function (matrices, profile, config) -> plan, registered in ALLOCATORS;
a new one is a new function (or file) and one registry entry.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import default_min_retention
from .linalg import min_truncation_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Matrix:
    name: str  # full module name, e.g. model.layers.3.self_attn.q_proj
    kind: str  # matrix type shared across layers, e.g. q_proj
    layer: int
    out_features: int
    in_features: int

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def params_per_rank(self) -> int:
        return self.out_features + self.in_features


@dataclass
class Profile:
    """What a profiling pass over the original model measured, for allocations that need it."""
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> σ(WX), descending
    layer_similarity: list[float] = field(default_factory=list)  # cos(input, output) per decoder layer
    sensitivity: dict[str, float] = field(default_factory=dict)  # name -> loss-gradient weight


def break_even_rank(m: Matrix) -> float:
    return m.dense_params / m.params_per_rank


def rank_for_keep(m: Matrix, keep: float) -> int:
    return int(math.floor(keep * m.dense_params / m.params_per_rank))


def saves_params(m: Matrix, rank: int) -> bool:
    return rank * m.params_per_rank < m.dense_params


def plan_params(matrices: list[Matrix], plan: dict[str, int]) -> int:
    """Parameters of the compressed linears under a plan (dense where absent)."""
    return sum(plan[m.name] * m.params_per_rank if m.name in plan else m.dense_params for m in matrices)


def _finish(matrices: list[Matrix], ranks: dict[str, int], min_rank: int) -> dict[str, int]:
    plan = {}
    for m in matrices:
        r = ranks[m.name]
        if r < min_rank:
            raise ValueError(
                f"{m.name}: the budget leaves rank {r} < --min-rank {min_rank}; lower the ratio or the minimum rank"
            )
        if saves_params(m, r):
            plan[m.name] = r
    return plan


def uniform(matrices: list[Matrix], profile: Profile | None, ratio: float, min_rank: int = 1, **_) -> dict[str, int]:
    keep = 1.0 - ratio
    return _finish(matrices, {m.name: rank_for_keep(m, keep) for m in matrices}, min_rank)


def exact_mean_ratios(raw: list[float], target: float, upper: float) -> list[float]:
    """Clamp ratios into [0, upper] and rescale the free ones so their mean is exactly `target`."""
    if not 0 <= target <= upper:
        raise ValueError(f"target ratio {target} outside [0, {upper}]")
    ratios = list(raw)
    fixed: dict[int, float] = {}
    for _ in range(len(ratios) + 1):
        free = [i for i in range(len(ratios)) if i not in fixed]
        budget = target * len(ratios) - sum(fixed.values())
        free_sum = sum(ratios[i] for i in free)
        if not free:
            break
        if free_sum <= 0:  # guard: nothing left to scale; share the remaining budget equally
            for i in free:
                ratios[i] = budget / len(free)
        else:
            for i in free:
                ratios[i] *= budget / free_sum
        over = [i for i in free if ratios[i] > upper or ratios[i] < 0]
        if not over:
            break
        for i in over:
            fixed[i] = min(max(ratios[i], 0.0), upper)
            ratios[i] = fixed[i]
    return ratios


def svd_llm_v2(matrices: list[Matrix], profile: Profile, ratio: float, min_rank: int = 1,
               max_ratio: float = 0.95, **_) -> dict[str, int]:
    """SVD-LLM V2 Alg. 1: within each matrix type, R_i ∝ 1/log(L_i), L_i the theoretical loss at the
    uniform ratio; the group's mean ratio stays R.

    The paper's score depends on the scale of the unnormalised X Xᵀ and is undefined for L ≤ 1 (their
    issue #35; it happens on SmolLM2's first o_proj). 1/log L → +∞ as L → 1⁺, i.e. "compress this one the
    most", so such a matrix is pinned at `max_ratio` and the rest of its group is renormalised to keep
    the group's budget exactly. Pinned matrices are logged."""
    keep_uniform = 1.0 - ratio
    ranks: dict[str, int] = {}
    for kind in dict.fromkeys(m.kind for m in matrices):
        group = [m for m in matrices if m.kind == kind]
        losses = [min_truncation_loss(profile.spectra[m.name], rank_for_keep(m, keep_uniform)) for m in group]
        pinned = [i for i, loss in enumerate(losses) if loss <= 1.0]
        free = [i for i in range(len(group)) if i not in pinned]
        ratios = [max_ratio] * len(group)
        if free:
            target = (len(group) * ratio - len(pinned) * max_ratio) / len(free)
            if target < 0:
                raise ValueError(f"v2 allocation: {len(pinned)} {kind} matrices have truncation loss <= 1 "
                                 f"(log <= 0) and pinning them at {max_ratio} overspends the budget")
            scores = [1.0 / math.log(losses[i]) for i in free]
            raw = [len(free) * target * s / sum(scores) for s in scores]
            for i, r in zip(free, exact_mean_ratios(raw, target, max_ratio)):
                ratios[i] = r
        elif abs(ratio - max_ratio) > 1e-12:
            raise ValueError(f"v2 allocation: every {kind} matrix has truncation loss <= 1; the score is undefined")
        if pinned:
            log.warning("v2 allocation: %d %s matrices have truncation loss <= 1 (log <= 0, undefined score); "
                        "pinned at ratio %.2f: %s", len(pinned), kind, max_ratio, [group[i].name for i in pinned])
        for m, r in zip(group, ratios):
            ranks[m.name] = max(rank_for_keep(m, 1.0 - r), 0)
        log.info("v2 ratios for %s: min %.3f max %.3f", kind, min(ratios), max(ratios))
    return _finish(matrices, ranks, min_rank)


def shift_to_budget(values: list[float], weights: list[float], target: float, lo: float, hi: float) -> list[float]:
    """clamp(v_i + t, lo, hi) with the one shift t that makes the weighted mean exactly `target`
    (the weighted mean is continuous and non-decreasing in t, so bisection finds it)."""
    if not lo <= target <= hi:
        raise ValueError(f"target {target} outside [{lo}, {hi}]")
    total = sum(weights)
    if total <= 0:
        raise ValueError("no parameters to allocate")

    def mean(t: float) -> float:
        return sum(w * min(max(v + t, lo), hi) for v, w in zip(values, weights)) / total

    low, high = lo - max(values), hi - min(values)  # mean(low) = lo ≤ target ≤ hi = mean(high)
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if mean(mid) < target else (low, mid)
    return [min(max(v + low, lo), hi) for v in values]


def adacr(matrices: list[Matrix], profile: Profile, ratio: float, min_rank: int = 1, min_retention: float | None = None,
          importance: str = "1-cos", **_) -> dict[str, int]:
    """AdaSVD's adaCR (§3.2): per decoder layer, importance I_i from the cosine similarity of the layer's
    input and output, mean-normalised (mean 1); retention k_i = mrr + I_i·(trr − mrr), trr = 1 − ratio.
    Every matrix of layer i gets k_i. The k_i are clamped to [mrr, 1] (a ratio in [0, 1 − mrr]) and shifted
    so the kept parameters are exactly trr of the dense ones; the ranks' rounding remainder is handed
    back one rank at a time while it fits, so the budget is met as tightly as integers allow.

    importance "1-cos": a layer that changes its input more matters more (the paper's Fig. 4 rates the
    first and last layers most important, and those have the lowest cos); "cos": the formula as written.
    docs/adacr-importance.md has the measurement behind the default."""
    keep = 1.0 - ratio
    if min_retention is None:
        min_retention = default_min_retention(ratio)
    if min_retention > keep:
        raise ValueError(f"adacr: --min-retention {min_retention} exceeds the target retention 1 - ratio = {keep:.3f}; "
                         "lower --min-retention")
    sims = profile.layer_similarity
    raw = {"1-cos": [1.0 - c for c in sims], "cos": list(sims)}.get(importance)
    if raw is None:
        raise ValueError(f"adacr importance must be '1-cos' or 'cos', got {importance!r}")
    layers = sorted({m.layer for m in matrices})
    scores = [raw[i] for i in layers]
    mean = sum(scores) / len(scores)
    if mean <= 0:  # guard: every layer is an identity (1-cos) / orthogonal to its input (cos)
        raise ValueError(f"adacr: mean layer importance is {mean:.3g}; cannot normalise ({importance})")
    base = [min_retention + s / mean * (keep - min_retention) for s in scores]
    weights = [sum(m.dense_params for m in matrices if m.layer == i) for i in layers]
    layer_keep = dict(zip(layers, shift_to_budget(base, weights, keep, min_retention, 1.0)))
    log.info("adacr retention per layer: %s", [round(layer_keep[i], 3) for i in layers])

    ranks = {m.name: rank_for_keep(m, layer_keep[m.layer]) for m in matrices}
    spare = keep * sum(m.dense_params for m in matrices) - sum(r * m.params_per_rank for m, r in
                                                              ((m, ranks[m.name]) for m in matrices))
    by_remainder = sorted(matrices, key=lambda m: -(layer_keep[m.layer] * break_even_rank(m) - ranks[m.name]))
    for m in by_remainder:
        if m.params_per_rank <= spare and ranks[m.name] + 1 < break_even_rank(m):
            ranks[m.name] += 1
            spare -= m.params_per_rank
    return _finish(matrices, ranks, min_rank)


Allocator = Callable[..., dict[str, int]]
ALLOCATORS: dict[str, Allocator] = {"uniform": uniform, "v2": svd_llm_v2, "adacr": adacr}
# Allocations that need a profiling pass before compression; those that need its whitened spectra.
NEEDS_PROFILE = {"v2", "adacr"}
NEEDS_SPECTRA = {"v2"}
# Allocations that also need Profile.sensitivity (a gradient pass of the LM loss, calibration/sensitivity.py).
NEEDS_SENSITIVITY = {"global-fisher", "global-fisher-per-type"}

from .allocation_global import global_fisher, global_fisher_per_type, global_relative  # noqa: E402 (imports Matrix)

ALLOCATORS.update({"global-relative": global_relative, "global-fisher": global_fisher,
                   "global-fisher-per-type": global_fisher_per_type})
NEEDS_PROFILE |= {"global-relative"} | NEEDS_SENSITIVITY
NEEDS_SPECTRA |= {"global-relative"} | NEEDS_SENSITIVITY


def allocate(name: str, matrices: list[Matrix], profile: Profile | None, ratio: float, **options) -> dict[str, int]:
    if name not in ALLOCATORS:
        raise ValueError(f"allocation {name!r} is not available; choose one of {', '.join(ALLOCATORS)}")
    plan = ALLOCATORS[name](matrices, profile, ratio, **options)
    kept, dense = plan_params(matrices, plan), sum(m.dense_params for m in matrices)
    budget = (1.0 - ratio) * dense
    if kept > budget + 1e-6 * dense:
        raise AssertionError(f"allocation {name} exceeds the budget: {kept} > {budget:.0f} parameters")
    return plan
