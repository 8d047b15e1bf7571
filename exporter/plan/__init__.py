"""Rank allocations: (matrices, profile, ratio) -> rank plan {module name: rank}.

A new allocation is one function (in its own file) and one registry entry below, saying which parts of
the profiling pass it reads: "similarity" (cos of each decoder layer's input and output, a forward pass),
"spectra" (σ(WX) of every linear: eigenvalues of one Gram per matrix), "sensitivity" (an LM-loss
backward walked one decoder layer at a time, plan/sensitivity.py). Beside them: --budget as a ratio (budget.py) and --rank-multiple
(rounding.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from ..model.candidates import Matrix
from .adacr import adacr
from .greedy import global_fisher, global_fisher_per_type, global_relative
from .profile import Profile
from .ranks import plan_params
from .uniform import uniform
from .v2 import svd_llm_v2

log = logging.getLogger(__name__)


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


def allocate(name: str, matrices: list[Matrix], profile: Profile | None, ratio: float, keep_dense_above: float = 1.0,
             **options) -> dict[str, int]:
    """The rank plan of allocation `name`. A matrix whose planned rank keeps at least `keep_dense_above` of its
    parameters saves almost nothing for its truncation error: it stays dense, and the allocation is made
    again over the other matrices with what is left of the budget (until no planned rank is that close)."""
    needs(name)  # an unknown name is one clear error
    if not 0.0 < keep_dense_above <= 1.0:
        raise ValueError(f"--keep-dense-above must be in (0, 1], got {keep_dense_above}")
    dense = sum(m.dense_params for m in matrices)
    budget = (1.0 - ratio) * dense
    kept_dense: list[Matrix] = []
    while True:
        rest = [m for m in matrices if m not in kept_dense]
        rest_dense = sum(m.dense_params for m in rest)
        rest_ratio = 1.0 - (budget - sum(m.dense_params for m in kept_dense)) / rest_dense if rest else 1.0
        if rest_ratio >= 1.0:
            raise ValueError(f"keeping the {len(kept_dense)} matrices planned above {keep_dense_above:.0%} of their "
                             "parameters dense leaves no budget for the others: raise --keep-dense-above")
        plan = ALLOCATORS[name].fn(rest, profile, rest_ratio, **options)
        near = [m for m in rest if m.name in plan and plan[m.name] * m.params_per_rank >= keep_dense_above * m.dense_params]
        if not near or keep_dense_above >= 1.0:  # 1: off, the allocation's plan as it is
            break
        kept_dense += near
    if kept_dense:
        log.info("%d matrices kept dense (planned rank kept >= %.0f%% of their parameters), e.g. %s",
                 len(kept_dense), 100 * keep_dense_above, kept_dense[0].name)
    kept = plan_params(matrices, plan)
    if kept > budget + 1e-6 * dense:
        raise AssertionError(f"allocation {name} exceeds the budget: {kept} > {budget:.0f} parameters")
    return plan
