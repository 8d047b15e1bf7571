"""A linear layer → its matmuls, from the module's weights.

    nn.Linear        x → MatMul(Wᵀ)                              tagged svd_export.module = <name>
    LowRankLinear    x → MatMul(downᵀ) → MatMul(upᵀ)             both tagged svd_export.lowrank = <name>
    CorrectedLinear  MatMulNBits(base) + MatMul(downᵀ)·MatMul(upᵀ)   the correction pair float (--correction-rank)
    quantized        the same matmuls as MatMulNBits (ORT's block quantizer, per weight, as it is written)

The bias is separate (bias()), so a caller can hand it to the op that follows (SkipLayerNorm's bias input)
instead of emitting an Add."""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import torch.nn as nn

from graph_rewrite.tags import LOWRANK_KEY, MODULE_KEY

from ...config import Quantization
from ...model.corrected import CorrectedLinear
from ...model.lowrank import LowRankLinear
from ...model.quantized import scales_of
from .graph import MS, GraphBuilder, to_numpy
from .quantize import quantize_weight


@dataclass(frozen=True)
class Precision:
    dtype: type  # numpy float type of the graph's activations and float weights
    quantization: Quantization | None = None


def weight_matmul(b: GraphBuilder, x: ir.Value, linear: nn.Linear, name: str, p: Precision,
                  metadata: dict) -> ir.Value:
    """x·Wᵀ for one nn.Linear's out×in weight, float or MatMulNBits (its own grid when the layer loop quantized
    it, model/quantized.py)."""
    w_kn = to_numpy(linear.weight).T  # MatMul's B: in×out
    if p.quantization is None:
        return b.op("MatMul", [x, b.weight(f"{name}.weight_t", w_kn.astype(p.dtype))], f"/{name}/MatMul",
                    metadata=metadata)
    q = p.quantization
    nbits = quantize_weight(w_kn, q, p.dtype, scales_of(linear))
    inputs = [x, b.weight(f"{name}.weight_q{q.bits}", nbits.packed), b.weight(f"{name}.weight_scales", nbits.scales)]
    if nbits.zero_points is not None:
        inputs.append(b.weight(f"{name}.weight_zero_points", nbits.zero_points))
    attrs = {"K": nbits.k, "N": nbits.n, "bits": q.bits, "block_size": q.block_size}
    if q.accuracy_level:
        attrs["accuracy_level"] = q.accuracy_level
    return b.op("MatMulNBits", inputs, f"/{name}/MatMulNBits", attrs, domain=MS, metadata=metadata)


def matmul(b: GraphBuilder, module: nn.Module, name: str, x: ir.Value, p: Precision) -> ir.Value:
    """The module's matmul(s), without its bias. `name` is the full module name (the tag)."""
    if isinstance(module, CorrectedLinear):  # the grid's MatMulNBits + the float correction pair, added
        grid = weight_matmul(b, x, module.base, name, p, {MODULE_KEY: name})
        fix = matmul(b, module.correction, f"{name}.correction", x, Precision(p.dtype))
        return b.op("Add", [grid, fix], f"/{name}/correction/Add")
    if isinstance(module, LowRankLinear):
        tag = {LOWRANK_KEY: name}
        hidden = weight_matmul(b, x, module.down, f"{name}.down", p, tag)
        return weight_matmul(b, hidden, module.up, f"{name}.up", p, tag)
    if isinstance(module, nn.Linear):
        return weight_matmul(b, x, module, name, p, {MODULE_KEY: name})
    raise TypeError(f"{name} is {type(module).__name__}: expected nn.Linear or LowRankLinear")


def bias(b: GraphBuilder, module: nn.Module, name: str, p: Precision) -> ir.Value | None:
    """The module's bias as a graph weight (None without one); a LowRankLinear carries it on `up`."""
    source = (module.up.bias if isinstance(module, LowRankLinear) else
              module.base.bias if isinstance(module, CorrectedLinear) else module.bias)
    return None if source is None else b.weight(f"{name}.bias", to_numpy(source).astype(p.dtype))


def linear(b: GraphBuilder, module: nn.Module, name: str, x: ir.Value, p: Precision) -> ir.Value:
    y = matmul(b, module, name, x, p)
    offset = bias(b, module, name, p)
    return y if offset is None else b.op("Add", [y, offset], f"/{name}/Add")
