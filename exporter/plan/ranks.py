"""Ratio ↔ rank arithmetic. A rank plan is plain data: {module name: rank}.

"ratio 0.4" removes 40% of the parameters of the compressed linears: kept fraction k = 1 − ratio,
rank r = floor(k·m·n/(m+n)); a pair stores r·(m+n) parameters and only saves any while
r < m·n/(m+n) (break-even). A matrix whose rank would not save parameters stays dense (absent from
the plan). Every allocation keeps Σ r_i (m_i + n_i) ≤ k · Σ m_i n_i.
"""
from __future__ import annotations

import math

from ..model.candidates import Matrix


def break_even_rank(m: Matrix) -> float:
    return m.dense_params / m.params_per_rank


def rank_for_keep(m: Matrix, keep: float) -> int:
    return int(math.floor(keep * m.dense_params / m.params_per_rank))


def saves_params(m: Matrix, rank: int) -> bool:
    return rank * m.params_per_rank < m.dense_params


def plan_params(matrices: list[Matrix], plan: dict[str, int]) -> int:
    """Parameters of the compressed linears under a plan (dense where absent)."""
    return sum(plan[m.name] * m.params_per_rank if m.name in plan else m.dense_params for m in matrices)


def finish_plan(matrices: list[Matrix], ranks: dict[str, int], min_rank: int) -> dict[str, int]:
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


