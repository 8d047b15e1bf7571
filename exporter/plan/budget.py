"""--budget: a target size of the model's weights ("7GB", "500MB", "7GiB") instead of a ratio.

Weights are counted as they are exported: every parameter once (tied embeddings once) at its own element
size, which is the export dtype since the model is loaded in it. What is not a candidate linear stays
dense (embeddings, lm_head, norms, biases, skipped linears) and is paid first; the rest of the budget is
the parameter budget of the compressed linears, handed to any allocation as the equivalent ratio.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from ..model.candidates import Matrix

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'7GB' -> 7·10⁹ bytes, '7GiB' -> 7·2³⁰, '500MB', '1.5GB', '123456' (bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if unit not in UNITS:
        raise ValueError(f"--budget {text!r}: expected a size such as 7GB, 500MB or 7GiB")
    size = int(float(match.group(1)) * UNITS[unit])
    if size <= 0:
        raise ValueError(f"--budget {text!r} must be positive")
    return size


def weight_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of every parameter once (parameters() yields tied weights once), at its own element size or,
    given `dtype`, at that of the export dtype (a streamed model computes in another dtype than it writes)."""
    size = None if dtype is None else torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() * (size or p.element_size()) for p in model.parameters())


def ratio_for_budget(model: nn.Module, matrices: list[Matrix], budget_bytes: int, dtype: torch.dtype | None = None) -> float:
    """The ratio (fraction of the candidate linears' parameters removed) that spends `budget_bytes` on the
    whole model's weights, counted in `dtype` (default: as the parameters are). A budget the dense model
    already meets is refused: it would compress nothing."""
    if not matrices:
        raise ValueError("--budget: the model has no linears to compress")
    element = (model.get_submodule(matrices[0].name).weight.element_size() if dtype is None
               else torch.empty((), dtype=dtype).element_size())
    linears = sum(m.dense_params for m in matrices)
    fixed = weight_bytes(model, dtype) - linears * element  # what stays dense whatever the ranks
    available = (budget_bytes - fixed) // element  # parameters left for the compressed linears
    if available <= 0:
        raise ValueError(f"--budget {budget_bytes:,} bytes is below the {fixed:,} bytes that the parts which stay "
                         "dense (embeddings, lm_head, norms, biases) already need")
    if available >= linears:
        raise ValueError(f"--budget {budget_bytes:,} bytes: the dense model's weights ({weight_bytes(model):,} bytes) "
                         "already fit, there is nothing to compress")
    return 1.0 - available / linears
