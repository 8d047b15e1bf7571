"""Rank allocations: (matrices, profile, ratio) -> rank plan {module name: rank}.

A new allocation is one function (in its own file) and one registry entry below, saying which parts of
the profiling pass it reads: "similarity" (cos of each decoder layer's input and output, a forward pass),
"spectra" (σ(WX) of every linear: eigenvalues of one Gram per matrix), "sensitivity" (a whole-model
LM-loss backward, calibration/sensitivity.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .adacr import adacr, shift_to_budget  # noqa: F401
from .greedy import global_fisher, global_fisher_per_type, global_relative
from .plan import (Matrix, Profile, break_even_rank, finish_plan, plan_params, rank_for_keep,  # noqa: F401
                   saves_params)
from .uniform import uniform
from .v2 import exact_mean_ratios, svd_llm_v2  # noqa: F401


@dataclass(frozen=True)
class Allocation:
    fn: Callable[..., dict[str, int]]
    needs: frozenset[str] = frozenset()  # subset of {"similarity", "spectra", "sensitivity"}


ALLOCATORS: dict[str, Allocation] = {
    "uniform": Allocation(uniform),
    "v2": Allocation(svd_llm_v2, frozenset({"similarity", "spectra"})),
    "adacr": Allocation(adacr, frozenset({"similarity"})),
    "global-relative": Allocation(global_relative, frozenset({"similarity", "spectra"})),
    "global-fisher": Allocation(global_fisher, frozenset({"similarity", "spectra", "sensitivity"})),
    "global-fisher-per-type": Allocation(global_fisher_per_type, frozenset({"similarity", "spectra", "sensitivity"})),
}


def needs(name: str) -> frozenset[str]:
    if name not in ALLOCATORS:
        raise ValueError(f"allocation {name!r} is not available; choose one of {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name].needs


def allocate(name: str, matrices: list[Matrix], profile: Profile | None, ratio: float, **options) -> dict[str, int]:
    needs(name)  # an unknown name is one clear error
    plan = ALLOCATORS[name].fn(matrices, profile, ratio, **options)
    kept, dense = plan_params(matrices, plan), sum(m.dense_params for m in matrices)
    budget = (1.0 - ratio) * dense
    if kept > budget + 1e-6 * dense:
        raise AssertionError(f"allocation {name} exceeds the budget: {kept} > {budget:.0f} parameters")
    return plan
