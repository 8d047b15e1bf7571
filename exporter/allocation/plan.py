"""Ratio ↔ rank arithmetic and the data every allocation works on. A rank plan is plain data:
{module name: rank}.

"ratio 0.4" removes 40% of the parameters of the compressed linears: kept fraction k = 1 − ratio,
rank r = floor(k·m·n/(m+n)); a pair stores r·(m+n) parameters and only saves any while
r < m·n/(m+n) (break-even). A matrix whose rank would not save parameters stays dense (absent from
the plan). Every allocation keeps Σ r_i (m_i + n_i) ≤ k · Σ m_i n_i.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


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
    layer_seconds: list[float] = field(default_factory=list)  # wall time of the profiling pass per layer
    uncalibrated: list[str] = field(default_factory=list)  # linears no calibration token reached (MoE experts)


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


