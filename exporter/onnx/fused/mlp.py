"""The feed-forward block.

    gated (Llama family):  down(act(gate(x)) · up(x))     SiLU as QuickGelu(alpha=1) = x·sigmoid(x), one op
    plain (OPT):           fc2(act(fc1(x)))

-> the last linear's matmul and its bias (the caller folds the bias into the next SkipLayerNorm)."""
from __future__ import annotations

import onnx_ir as ir
import torch.nn as nn

from .family import ACTIVATIONS, Family
from .graph import GraphBuilder
from .linear import Precision, bias, linear, matmul


def mlp(b: GraphBuilder, layer: nn.Module, prefix: str, x: ir.Value, activation: str, family: Family,
        p: Precision) -> tuple[ir.Value, ir.Value | None]:
    op, domain, attrs = ACTIVATIONS[activation]
    *inner, last = family.mlp
    first = linear(b, layer.get_submodule(inner[0]), f"{prefix}.{inner[0]}", x, p)
    hidden = b.op(op, [first], f"/{prefix}.{inner[0]}/{op}", attrs, domain=domain)
    if family.gated:
        up = linear(b, layer.get_submodule(inner[1]), f"{prefix}.{inner[1]}", x, p)
        hidden = b.op("Mul", [hidden, up], f"/{prefix}.mlp/Mul")
    module, name = layer.get_submodule(last), f"{prefix}.{last}"
    return matmul(b, module, name, hidden, p), bias(b, module, name, p)
