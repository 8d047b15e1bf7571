"""One decoder layer's linears on the grid, with the statistics the layer loop holds.

    nn.Linear        GPTQ with H = X Xᵀ of its input
    LowRankLinear    down: GPTQ with X Xᵀ; up reads h = down_q·x, so its Hessian is down_q X Xᵀ down_qᵀ, and
                     first up is refitted to that input (the least-squares up given the rounded down, towards
                     what the float pair computed: up·down X (down_q X)ᵀ (down_q X Xᵀ down_qᵀ)⁻¹), so the
                     rounding of down is compensated instead of carried; then GPTQ on up

The weights become the grid's values in their own dtype, the scales a buffer beside them (model/quantized.py);
the record of each weight (‖(W − Q)X‖² of GPTQ and of round-to-nearest) goes to the report.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import Quantization
from ..model.lowrank import LowRankLinear
from ..model.quantized import set_scales
from .gptq import DAMPING, SHRINKS, gptq, weighted_error
from .grid import round_to_nearest


def put_on_grid_(linear: nn.Linear, values: torch.Tensor, scales: torch.Tensor) -> None:
    """In place: the weight takes the grid's values (in its own dtype), the scales go beside it."""
    with torch.no_grad():
        linear.weight.copy_(values.to(linear.weight.dtype))
    set_scales(linear, scales.to(linear.weight.device))


def quantize_linear_(linear: nn.Linear, hessian: torch.Tensor, q: Quantization, scale_dtype: torch.dtype) -> dict:
    """In place: `linear`'s weight on the grid (GPTQ with `hessian`), its scales attached. -> its record, with
    round-to-nearest's error on the same grid for comparison."""
    w = linear.weight.detach().to(torch.float64)
    h = hessian.to(w.device)
    values, scales = gptq(w, h, q, scale_dtype, shrinks=SHRINKS)
    nearest, _ = round_to_nearest(w, q, scale_dtype)
    put_on_grid_(linear, values, scales)
    return {"gptq": weighted_error(w, values, h), "nearest": weighted_error(w, nearest, h)}


def refit_up(up: torch.Tensor, down: torch.Tensor, down_q: torch.Tensor, gram: torch.Tensor,
             damping: float = DAMPING) -> torch.Tensor:
    """The up (out×r) whose output on down_q X is closest to up·down X: a ridge-damped least squares, the
    damping relative to the mean eigenvalue of the r×r Hessian, as GPTQ's own."""
    h = down_q @ gram @ down_q.T
    h = (h + h.T) / 2
    h += damping * torch.diagonal(h).mean().clamp_min(torch.finfo(h.dtype).tiny) * torch.eye(h.shape[0], dtype=h.dtype,
                                                                                            device=h.device)
    right = down @ gram @ down_q.T  # r×r
    return torch.linalg.solve(h, (up @ right).T).T  # guard above: h is positive definite after the damping


def quantize_pair_(module: LowRankLinear, gram: torch.Tensor, q: Quantization, scale_dtype: torch.dtype) -> dict:
    up = module.up.weight.detach().to(torch.float64)
    down = module.down.weight.detach().to(torch.float64)
    gram = gram.to(down.device, torch.float64)
    record = {"down": quantize_linear_(module.down, gram, q, scale_dtype)}
    down_q = module.down.weight.detach().to(torch.float64)
    with torch.no_grad():
        module.up.weight.copy_(refit_up(up, down, down_q, gram).to(module.up.weight.dtype))
    record["up"] = quantize_linear_(module.up, down_q @ gram @ down_q.T, q, scale_dtype)
    return record


def quantize_module_(module: nn.Module, gram: torch.Tensor, q: Quantization, scale_dtype: torch.dtype) -> dict:
    """One candidate linear of a layer, dense or low-rank. -> its record."""
    if isinstance(module, LowRankLinear):
        return quantize_pair_(module, gram, q, scale_dtype)
    if isinstance(module, nn.Linear):
        return quantize_linear_(module, gram.to(torch.float64), q, scale_dtype)
    raise TypeError(f"--quantize writes MatMulNBits for nn.Linear and LowRankLinear, not {type(module).__name__}")
