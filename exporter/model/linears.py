"""What counts as a compressible linear, and its weight in one orientation.

nn.Linear holds W as out×in. transformers' Conv1D (GPT-2 and its descendants) computes the same
x·Wᵀ + b but stores the weight transposed, in×out. Everything downstream (statistics, factorization,
the LowRankLinear that replaces it) works on out×in, so this is the one place that knows the difference.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _conv1d_class():
    from transformers.pytorch_utils import Conv1D
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, _conv1d_class()))


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features); read from the parameter's shape, so it works on the meta device."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, _conv1d_class()):
        in_features, out_features = module.weight.shape
        return out_features, in_features
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """W as out×in (a view for Conv1D, never a copy)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, _conv1d_class()):
        return module.weight.T
    raise TypeError(f"{type(module).__name__} is not a linear layer")
