"""Refinement that sees the rounding (--quantize with --refine block): while a layer's factors are optimised,
each factor's forward uses its values on the grid (grid.round_to_nearest) and the gradient passes
straight through to the float weights (the straight-through estimator). The loss the optimiser and its
never-worse check see is then the loss of rounded factors; GPTQ rounds the refined factors afterwards.

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
from .grid import round_to_nearest


class RoundedForward(nn.Module):
    """w ↦ w + (Q(w) − w).detach(): Q(w) in the forward, the identity in the backward."""

    def __init__(self, q: Quantization, scale_dtype: torch.dtype):
        super().__init__()
        self.q, self.scale_dtype = q, scale_dtype

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (round_to_nearest(weight.detach(), self.q, self.scale_dtype)[0] - weight.detach())


@contextmanager
def rounded_factors(layer: nn.Module, q: Quantization, scale_dtype: torch.dtype):
    """Every factor of every LowRankLinear in `layer` computes with its grid values for the duration of the
    block; on exit (also on an error) the float weights are back as plain parameters."""
    linears = [f for m in layer.modules() if isinstance(m, LowRankLinear) for f in (m.down, m.up)]
    for linear in linears:
        parametrize.register_parametrization(linear, "weight", RoundedForward(q, scale_dtype), unsafe=True)
    try:
        yield
    finally:
        for linear in linears:
            if parametrize.is_parametrized(linear, "weight"):
                parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
