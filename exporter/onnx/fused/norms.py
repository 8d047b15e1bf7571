"""Normalizations as ORT's fused ops. The residual stream is folded into them: a Skip*LayerNorm adds
the block output to the residual (plus an optional bias) and normalizes the sum, returning both.

    rms:   SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (RMSNorm: Llama family)
    layer: LayerNormalization / SkipLayerNormalization (with β: OPT)
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import torch.nn as nn

from .graph import MS, GraphBuilder, to_numpy
from .linear import Precision


@dataclass(frozen=True)
class Norm:
    """A norm's weights, already in the data file, and what its op needs."""
    name: str
    kind: str  # "rms" | "layer"
    weights: tuple[ir.Value, ...]  # γ, or γ and β
    epsilon: float


def epsilon_of(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        if hasattr(norm, attr):
            return float(getattr(norm, attr))
    raise TypeError(f"{type(norm).__name__}: no epsilon (variance_epsilon / eps) to read")


def write_norm(b: GraphBuilder, norm: nn.Module, name: str, kind: str, p: Precision) -> Norm:
    weights = [b.weight(f"{name}.weight", to_numpy(norm.weight).astype(p.dtype))]
    if kind == "layer":
        weights.append(b.weight(f"{name}.bias", to_numpy(norm.bias).astype(p.dtype)))
    return Norm(name, kind, tuple(weights), epsilon_of(norm))


def normalize(b: GraphBuilder, x: ir.Value, norm: Norm, axis: int = -1) -> ir.Value:
    """norm(x), no residual."""
    op = "SimplifiedLayerNormalization" if norm.kind == "rms" else "LayerNormalization"
    attrs = {"axis": axis, "epsilon": norm.epsilon, "stash_type": 1}  # statistics in float32
    return b.op(op, [x, *norm.weights], f"/{norm.name}/{op}", attrs)


def skip_normalize(b: GraphBuilder, residual: ir.Value, block_out: ir.Value, block_bias: ir.Value | None,
                   norm: Norm, out: ir.Value | None = None) -> tuple[ir.Value, ir.Value]:
    """s = residual + block_out (+ block_bias); -> (norm(s) (into `out` when given), s)."""
    op = "SkipSimplifiedLayerNormalization" if norm.kind == "rms" else "SkipLayerNormalization"
    inputs = [block_out, residual, *norm.weights]
    if block_bias is not None:  # the bias input follows γ (rms) or γ, β (layer)
        inputs.append(block_bias)
    normed, _, _, total = b.op(op, inputs, f"/{norm.name}/{op}", {"epsilon": norm.epsilon}, domain=MS,
                               outputs=[out, "", "", None])  # no mean / inverse std
    return normed, total
