"""Global, loss-aware rank allocation: every matrix's rank at once, under one parameter budget.

Dropping the j-th whitened component of matrix i adds σ_ij² to ‖W_i X_i − W_i' X_i‖² (σ = singular values
of W_i X_i, `Profile.spectra`) and saves m_i + n_i parameters. With a sensitivity weight w_i per matrix we
minimise Σ_i w_i Σ_{j>r_i} σ_ij²  subject to  Σ_i cost_i(r_i) ≤ budget, where cost_i(r) = r·(m_i + n_i)
while that is below m_i·n_i and the matrix otherwise stays dense (cost m_i·n_i, no loss).

Each matrix is a chain of purchases from its floor rank upwards: the next component (cost m+n, gain w σ²)
and, at the break-even rank, "go dense" (cost m·n − r·(m+n) ≤ m+n, gain the whole remaining tail). Gains of
components shrink (σ is descending) but going dense can be worth more per parameter than the components
before it, so each chain is replaced by its upper concave envelope: violating steps are pooled into one
indivisible step. Then every chain has diminishing returns and one sort of all steps by gain per
parameter gives the order of a greedy that is optimal for the budget it spends (the fractional-knapsack
argument). When a step does not fit, its matrix is closed (later steps of the same chain need it first)
and the greedy goes on with the others, so at the end no further step of any matrix fits. The integer
problem can still lose up to one step's gain against the exact knapsack optimum when chains have different
step costs; tests/test_allocation_global.py checks both statements against brute force.

Weights (the allocation names):
  global-relative  w_i = 1 / ‖W_i X_i‖²: every matrix's relative output error counts the same.
  global-fisher    w_i = mean squared gradient of the LM loss w.r.t. the matrix's output
                   (exporter/plan/sensitivity.py): output error in units of the network's loss.
  global-fisher-per-type  the same weight, one greedy per matrix type with that type's share of the budget.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..model.candidates import Matrix
from .profile import Profile

log = logging.getLogger(__name__)

DENSE = -1  # the rank a step leads to when it turns its matrix back into a dense linear


@dataclass(frozen=True)
class Step:
    cost: int  # parameters it adds
    gain: float  # weighted squared output error it removes
    rank: int  # the matrix's rank after it (DENSE: the matrix stays dense)


def chain(m: Matrix, spectrum: torch.Tensor, weight: float, floor: int) -> list[Step]:
    """The concave chain of purchases of one matrix above its floor rank (see the module docstring)."""
    p, d = m.params_per_rank, m.dense_params
    last = (d - 1) // p  # the largest rank that still saves parameters: last·p < d
    energy = [weight * float(s) for s in spectrum.to(torch.float64).square()]
    tail = math.fsum(energy[last:])
    elementary = [Step(p, energy[r], r + 1) for r in range(floor, last)]
    elementary.append(Step(d - last * p, tail, DENSE))
    steps: list[Step] = []
    for step in elementary:
        cost, gain = step.cost, step.gain
        # pool with the previous step while it is worth less per parameter (gain/cost < new gain/cost)
        while steps and steps[-1].gain * cost < gain * steps[-1].cost:
            prev = steps.pop()
            cost, gain = cost + prev.cost, gain + prev.gain
        steps.append(Step(cost, gain, step.rank))
    return steps


def greedy_ranks(matrices: list[Matrix], spectra: dict[str, torch.Tensor], weights: dict[str, float],
                 budget: int, min_rank: int = 1) -> dict[str, int]:
    """{name: rank} for the matrices that end up low-rank (absent: dense), spending at most `budget`
    parameters over `matrices`. Floors (min_rank) are paid first; a matrix whose floor would not save
    parameters stays dense and is paid in full."""
    ranks: dict[str, int] = {}
    prepaid = 0
    candidates = []  # (gain per parameter, matrix index, step index, step)
    for i, m in enumerate(matrices):
        if min_rank * m.params_per_rank >= m.dense_params:
            prepaid += m.dense_params
            ranks[m.name] = DENSE
            continue
        if len(spectra[m.name]) < (m.dense_params - 1) // m.params_per_rank:
            raise ValueError(f"{m.name}: the spectrum has {len(spectra[m.name])} values, fewer than the "
                             f"break-even rank of a {m.out_features}×{m.in_features} matrix")
        prepaid += min_rank * m.params_per_rank
        ranks[m.name] = min_rank
        rate = math.inf
        for k, step in enumerate(chain(m, spectra[m.name], weights[m.name], min_rank)):
            # running minimum: the chain's rates fall, and rounding in the division must not reorder them
            rate = min(rate, step.gain / step.cost)
            candidates.append((rate, i, k, step))
    left = budget - prepaid
    if left < 0:
        raise ValueError(f"the budget ({budget:,} parameters of the compressed linears) is below what the "
                         f"minimum rank {min_rank} already needs ({prepaid:,}); lower --min-rank or raise the budget")
    closed: set[int] = set()
    # Highest gain per parameter first; within one matrix the chain order (its steps have falling
    # gain per parameter, ties keep the chain order through the index k).
    for _, i, _, step in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
        if i in closed:
            continue
        if step.cost > left:
            closed.add(i)
            continue
        left -= step.cost
        ranks[matrices[i].name] = step.rank
    return {name: r for name, r in ranks.items() if r != DENSE}


def relative_weights(matrices: list[Matrix], profile: Profile) -> dict[str, float]:
    weights = {}
    for m in matrices:
        energy = float(profile.spectra[m.name].to(torch.float64).square().sum())
        # guard: W X = 0 means truncation costs nothing here; with weight 0 its steps are bought last
        weights[m.name] = 1.0 / energy if energy > 0 else 0.0
    return weights


def fisher_weights(matrices: list[Matrix], profile: Profile) -> dict[str, float]:
    missing = [m.name for m in matrices if m.name not in profile.sensitivity]
    if missing:
        raise ValueError(f"global-fisher needs the gradient sensitivity of every matrix; missing {missing[0]}")
    return {m.name: profile.sensitivity[m.name] for m in matrices}


def _global(weights: dict[str, float], matrices: list[Matrix], profile: Profile, ratio: float,
            min_rank: int, per_type: bool = False) -> dict[str, int]:
    groups = [[m for m in matrices if m.kind == kind] for kind in dict.fromkeys(m.kind for m in matrices)]
    plan = {}
    for group in groups if per_type else [matrices]:
        budget = int(math.floor((1.0 - ratio) * sum(m.dense_params for m in group)))
        plan.update(greedy_ranks(group, profile.spectra, weights, budget, min_rank))
    kinds = {}
    for m in matrices:
        kinds.setdefault(m.kind, []).append(plan[m.name] / (m.dense_params / m.params_per_rank)
                                            if m.name in plan else 1.0)
    log.info("global allocation, kept fraction of break-even rank per type: %s",
             {k: f"{min(v):.2f}..{max(v):.2f}" for k, v in kinds.items()})
    return plan


def global_relative(matrices: list[Matrix], profile: Profile, ratio: float, min_rank: int = 1, **_) -> dict[str, int]:
    return _global(relative_weights(matrices, profile), matrices, profile, ratio, min_rank)


def global_fisher(matrices: list[Matrix], profile: Profile, ratio: float, min_rank: int = 1, **_) -> dict[str, int]:
    return _global(fisher_weights(matrices, profile), matrices, profile, ratio, min_rank)


def global_fisher_per_type(matrices: list[Matrix], profile: Profile, ratio: float, min_rank: int = 1,
                           **_) -> dict[str, int]:
    """The same greedy, run separately within each matrix type with that type's share of the budget (the
    grouping of SVD-LLM V2's Alg. 1). Within one type the outputs live in alike spaces (all residual-stream
    writes, all attention keys, ...), so the one-number-per-matrix Fisher trace compares like with like; across
    types (attention logits vs residual stream vs gated MLP hidden) it is the least trustworthy part of the
    proxy, and the type balance is kept at the uniform one that both papers validated."""
    return _global(fisher_weights(matrices, profile), matrices, profile, ratio, min_rank, per_type=True)
