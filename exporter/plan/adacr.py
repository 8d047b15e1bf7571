"""AdaSVD's adaCR (§3.2): a retention per decoder layer from the cosine similarity of its input and output."""
from __future__ import annotations

import logging

from ..config import default_min_retention
from ..model.candidates import Matrix
from .profile import Profile
from .ranks import break_even_rank, finish_plan, rank_for_keep

log = logging.getLogger(__name__)


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
    return finish_plan(matrices, ranks, min_rank)
