"""--rank-multiple N: ranks rounded to multiples of N (kernel tiles, quantization blocks along a factor's
rank dimension), the parameter budget still met.

A pure function of the plan: every rank goes down to a multiple of N (up to N when that is below N and N
still saves parameters); ranks are then taken back by N from the largest while the plan overspends, and
the spare budget is handed back one step of N at a time, largest rounding loss first. A matrix whose
rounded rank would not save parameters stays dense (absent from the plan), as in every allocation.
"""
from __future__ import annotations

from ..model.candidates import Matrix
from .ranks import plan_params, saves_params


def round_ranks(matrices: list[Matrix], plan: dict[str, int], multiple: int,
                budget_params: int | None = None) -> dict[str, int]:
    """-> a plan whose ranks are multiples of `multiple` with plan_params ≤ budget_params (default: what
    `plan` spends, which already meets the ratio's budget)."""
    if multiple < 1:
        raise ValueError(f"--rank-multiple must be >= 1, got {multiple}")
    if multiple == 1:
        return dict(plan)
    by_name = {m.name: m for m in matrices}
    unknown = sorted(set(plan) - set(by_name))
    if unknown:
        raise ValueError(f"the rank plan names {unknown[0]}, which is not a candidate matrix")
    budget = plan_params(matrices, plan) if budget_params is None else budget_params
    rounded: dict[str, int] = {}
    for name, rank in plan.items():
        m, down = by_name[name], rank // multiple * multiple
        if down >= multiple:
            rounded[name] = down
        elif saves_params(m, multiple):
            rounded[name] = multiple
        # else: no multiple of N saves parameters on this matrix: it stays dense

    def spent() -> int:
        return plan_params(matrices, rounded)

    while spent() > budget:  # only the ranks raised to N (or kept dense) can overspend
        largest = max((n for n in rounded if rounded[n] >= 2 * multiple), key=lambda n: rounded[n], default=None)
        if largest is None:
            raise ValueError(f"--rank-multiple {multiple}: no plan of multiples of {multiple} meets the budget of "
                             f"{budget} parameters; use a smaller multiple")
        rounded[largest] -= multiple
    spare = budget - spent()
    for name in sorted(rounded, key=lambda n: rounded[n] - plan[n]):  # most rounded down first
        m = by_name[name]
        cost = multiple * m.params_per_rank
        if cost <= spare and rounded[name] < plan[name] and saves_params(m, rounded[name] + multiple):
            rounded[name] += multiple
            spare -= cost
    return rounded
