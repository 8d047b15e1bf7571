"""The same ratio for every matrix."""
from __future__ import annotations

from ..model.candidates import Matrix
from .profile import Profile
from .ranks import finish_plan, rank_for_keep


def uniform(matrices: list[Matrix], profile: Profile | None, ratio: float, min_rank: int = 1, **_) -> dict[str, int]:
    keep = 1.0 - ratio
    return finish_plan(matrices, {m.name: rank_for_keep(m, keep) for m in matrices}, min_rank)
