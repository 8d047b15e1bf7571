"""A dense linear that was compressed → two low-rank MatMuls.

    MatMul(X, W)              → MatMul(MatMul(X, downᵀ), upᵀ)
    Gemm(X, W, [C], transB)   → MatMul(MatMul(X, downᵀ), upᵀ) [+ C]

W ≈ up·down with down r×in and up out×r (LowRankLinear's layout). The node is recognised by its
module tag (graph_rewrite.module_names), never by position; the dense weight initializer is left
unused and removed by the cleanup that follows. A linear's bias is not part of the match: the exporter
emits it as a separate Add (MatMul) or Gemm's C, both kept, and compress_ keeps the bias unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from graph_rewrite.module_names import out_in_shape, tagged_module
from graph_rewrite.tags import LOWRANK_KEY


@dataclass(frozen=True)
class LowRankFactors:
    down: np.ndarray  # rank × in
    up: np.ndarray  # out × rank
    bias: np.ndarray | None = None  # kept in the graph as it was; recorded for checks only

    @property
    def out_in(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]


class _LowRankBase(pattern.RewriteRuleClassBase):
    def __init__(self, factors: Mapping[str, LowRankFactors]):
        super().__init__(name=type(self).__name__)
        self.factors = factors

    def check_weight(self, node: ir.Node, w: ir.Value) -> MatchResult:
        result = MatchResult()
        if LOWRANK_KEY in node.metadata_props:
            return result.fail(f"{node.name} is already one of a low-rank pair")
        module = tagged_module(node)
        if module is None:
            return result.fail(f"{node.op_type} {node.name}: weight not tagged with a module name")
        if module not in self.factors:
            return result.fail(f"{module} was not compressed")
        if w.const_value is None:
            return result.fail(f"{module}: weight is not a constant")
        if out_in_shape(node) != self.factors[module].out_in:
            return result.fail(f"{module}: graph weight (out, in) {out_in_shape(node)} "
                               f"!= factors {self.factors[module].out_in}")
        return result

    def lowrank(self, op, node: ir.Node, x: ir.Value, w: ir.Value) -> ir.Value:
        module = tagged_module(node)
        factors = self.factors[module]
        dtype = w.const_value.dtype.numpy()  # the graph's precision, whatever the factors were kept in
        down_t = op.initializer(ir.tensor(np.ascontiguousarray(factors.down.T.astype(dtype))),
                                name=f"{module}.down.weight_t")
        up_t = op.initializer(ir.tensor(np.ascontiguousarray(factors.up.T.astype(dtype))),
                              name=f"{module}.up.weight_t")
        hidden = op.MatMul(x, down_t)
        out = op.MatMul(hidden, up_t)
        for value in (hidden, out):
            value.producer().metadata_props[LOWRANK_KEY] = module
        return out


class LowRankMatMul(_LowRankBase):
    def pattern(self, op, x, w):
        return op.MatMul(x, w, _outputs=["y"])

    def check(self, context, x, w, y) -> MatchResult:
        return self.check_weight(y.producer(), w)

    def rewrite(self, op, x, w, y):
        return self.lowrank(op, y.producer(), x, w)


class LowRankGemm(_LowRankBase):
    def pattern(self, op, x, w):
        return op.Gemm(x, w, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, w, y) -> MatchResult:
        node = y.producer()
        attrs = node.attributes
        if attrs.get_int("transA", 0) != 0:
            return MatchResult().fail(f"Gemm {node.name}: transA=1 is not a linear layer")
        if attrs.get_float("alpha", 1.0) != 1.0:
            return MatchResult().fail(f"Gemm {node.name}: alpha != 1")
        has_c = len(node.inputs) > 2 and node.inputs[2] is not None
        if has_c and attrs.get_float("beta", 1.0) != 1.0:
            return MatchResult().fail(f"Gemm {node.name}: beta != 1 on its bias")
        return self.check_weight(node, w)

    def rewrite(self, op, x, w, y):
        node = y.producer()
        out = self.lowrank(op, node, x, w)
        c = node.inputs[2] if len(node.inputs) > 2 else None
        return op.Add(out, c) if c is not None else out


def lowrank_rules(factors: Mapping[str, LowRankFactors]) -> list[pattern.RewriteRule]:
    return [LowRankMatMul.rule(factors), LowRankGemm.rule(factors)]
