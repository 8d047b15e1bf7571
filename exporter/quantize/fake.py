"""Refinement that sees the rounding (--quantize): while factors are optimised, each factor's forward uses its
values on the grid and the gradient passes straight through to the float weights (the straight-through
estimator), so the loss the optimiser and its never-worse check see is the loss of rounded factors.

- Block refinement (--refine-rounded, `rounded_factors`): the factors are not on a grid yet; their forward is
  round-to-nearest with the plain block scales (grid.round_to_nearest), and GPTQ rounds the refined factors
  afterwards.
- End-to-end refinement (`factors_on_their_grids`): the layer loop has already put every factor on its grid, the
  scales chosen by GPTQ's search. Those scales stay fixed: the forward rounds the float master to nearest on them
  (grid.round_on), so the first step computes exactly the shipped model, and at the end each factor is put on
  its grid as the last forward saw it: what was optimised is what is written.

torch's parametrizations do the swap: `linear.weight` reads through the rounding, the float weight is
`linear.parametrizations.weight.original` (what model/lowrank.trained_weight returns), and removing the
parametrization leaves that float weight in place."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..config import Quantization
from ..model.lowrank import LowRankLinear
from ..model.quantized import scales_of
from .grid import round_on, round_to_nearest
from .layer import put_on_grid_


class RoundedForward(nn.Module):
    """w ↦ w + (Q(w) − w).detach(): Q(w) in the forward, the identity in the backward."""

    def __init__(self, q: Quantization, scale_dtype: torch.dtype):
        super().__init__()
        self.q, self.scale_dtype = q, scale_dtype

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (round_to_nearest(weight.detach(), self.q, self.scale_dtype)[0] - weight.detach())


@contextmanager
def forward_through(linears: list[nn.Linear], rounding):
    """Each of `linears` computes with `rounding(linear)`'s parametrization of its weight for the duration of the
    block; on exit (also on an error) the float weights are back as plain parameters."""
    for linear in linears:
        parametrize.register_parametrization(linear, "weight", rounding(linear), unsafe=True)
    try:
        yield
    finally:
        for linear in linears:
            if parametrize.is_parametrized(linear, "weight"):
                parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)


def rounded_factors(layer: nn.Module, q: Quantization, scale_dtype: torch.dtype):
    """Context: every factor of every LowRankLinear in `layer` computes with its round-to-nearest values."""
    linears = [f for m in layer.modules() if isinstance(m, LowRankLinear) for f in (m.down, m.up)]
    return forward_through(linears, lambda _: RoundedForward(q, scale_dtype))


class OnItsGrid(nn.Module):
    """w ↦ w + (Q_s(w) − w).detach() for fixed scales s: the grid the factor was put on, kept."""

    def __init__(self, q: Quantization, scales: torch.Tensor):
        super().__init__()
        self.q, self.scales = q, scales

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (round_on(weight.detach(), self.scales, self.q) - weight.detach())


@contextmanager
def factors_on_their_grids(model: nn.Module, q: Quantization):
    """Every factor of `model` that is on a grid (its scales beside it: model/quantized.py) computes with its grid
    values for the duration of the block; the others (a --correction-rank pair, float in the graph) train as
    floats. On a normal exit each gridded factor is put on its grid, the scales unchanged; on an error the float
    weights are left as they are (the run is failing)."""
    linears = [f for m in model.modules() if isinstance(m, LowRankLinear) for f in (m.down, m.up)
               if scales_of(f) is not None]
    with forward_through(linears, lambda linear: OnItsGrid(q, scales_of(linear))):
        yield
    for linear in linears:  # reached only without an error
        scales = scales_of(linear)
        put_on_grid_(linear, round_on(linear.weight.detach(), scales, q), scales)
