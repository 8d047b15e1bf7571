"""What the allocations read about the original model, measured by the profile pass before any matrix is
compressed (exporter/loop/profile.py) and, for the gradient allocations, by a whole-model backward
(exporter/plan/sensitivity.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Profile:
    """What a profiling pass over the original model measured, for allocations that need it."""
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> σ(WX), descending
    layer_similarity: list[float] = field(default_factory=list)  # cos(input, output) per decoder layer
    sensitivity: dict[str, float] = field(default_factory=dict)  # name -> loss-gradient weight
    layer_seconds: list[float] = field(default_factory=list)  # wall time of the profiling pass per layer
    uncalibrated: list[str] = field(default_factory=list)  # linears no calibration token reached (MoE experts)
