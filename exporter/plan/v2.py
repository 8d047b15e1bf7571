"""SVD-LLM V2's allocation (paper Alg. 1): within each matrix type, ratio ∝ 1/log(theoretical loss)."""
from __future__ import annotations

import logging
import math

from ..factorize.linalg import min_truncation_loss
from ..model.candidates import Matrix
from .profile import Profile
from .ranks import finish_plan, rank_for_keep

log = logging.getLogger(__name__)


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
            raise ValueError(f"v2 allocation: every {kind} matrix has truncation loss <= 1 at the uniform rank, where "
                             "1/log L is undefined (too few calibration tokens make WX's rank fall below it: use "
                             "more, or another --allocation)")
        if pinned:
            log.warning("v2 allocation: %d %s matrices have truncation loss <= 1 (log <= 0, undefined score); "
                        "pinned at ratio %.2f: %s", len(pinned), kind, max_ratio, [group[i].name for i in pinned])
        for m, r in zip(group, ratios):
            ranks[m.name] = max(rank_for_keep(m, 1.0 - r), 0)
        log.info("v2 ratios for %s: min %.3f max %.3f", kind, min(ratios), max(ratios))
    return finish_plan(matrices, ranks, min_rank)
