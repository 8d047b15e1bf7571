"""A linear on the quantization grid with a float low-rank correction beside it (--correction-rank):

    x -> base(x) + up(down(x))        base: nn.Linear, its weight Q(W) on the MatMulNBits grid (scales beside it)
                                      correction: a LowRankLinear (no bias) holding W − Q(W)'s best rank-r part

Two ordinary children, so the state dict has plain names (`<module>.base.weight`, `<module>.base.weight_scale_bits`,
`<module>.correction.down.weight`, `<module>.correction.up.weight`) and the graph writes the base as MatMulNBits and
the correction as two float MatMuls. The correction is never quantized: grid_linears says which linears are.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from .linears import linear_dims, linear_weight
from .lowrank import LowRankLinear, swap_module


class CorrectedLinear(nn.Module):
    def __init__(self, base: nn.Linear, correction: LowRankLinear):
        super().__init__()
        if correction.up.bias is not None:
            raise ValueError("a correction has no bias: the base linear holds it")
        self.base, self.correction = base, correction

    @property
    def rank(self) -> int:
        return self.correction.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.correction(x)


def build_corrections(model: nn.Module, ranks: dict[str, int]) -> None:
    """Wrap each named nn.Linear in a CorrectedLinear with an (uninitialised) correction of the given rank, in
    place: the skeleton a saved model's state dict is loaded into."""
    for name, rank in ranks.items():
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{name} is {type(base).__name__}: a correction goes beside an nn.Linear")
        out_features, in_features = linear_dims(base)
        weight = linear_weight(base)
        correction = LowRankLinear(in_features, out_features, rank, bias=False, device=weight.device,
                                   dtype=weight.dtype)
        swap_module(model, name, CorrectedLinear(base, correction))


def grid_linears(root: nn.Module) -> Iterator[nn.Linear]:
    """Every nn.Linear under `root` that a quantized graph runs as MatMulNBits: all but the corrections' factors."""
    floats = {id(m) for c in root.modules() if isinstance(c, CorrectedLinear) for m in c.correction.modules()}
    return (m for m in root.modules() if isinstance(m, nn.Linear) and id(m) not in floats)


def corrections_of(model: nn.Module) -> dict[str, int]:
    """{module name: correction rank} of every CorrectedLinear (what build_corrections rebuilds)."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, CorrectedLinear)}
