"""Ordered rules → cleanup → checker, on an onnx-ir model in place.

rewrite_lowrank is the pass the exporter uses: every compressed module must be found in the graph and
rewritten, or it is an error naming the module (never a dense layer silently left in the artifact).
"""
from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import RewritePass, pattern

from graph_rewrite.module_names import linear_nodes, tagged_module
from graph_rewrite.rules.lowrank import LowRankFactors, lowrank_rules
from graph_rewrite.tags import LOWRANK_KEY


class RewriteError(RuntimeError):
    pass


# The onnx checker gets a serialized copy of the model in which onnx-ir keeps only the initializers of at
# most this many bytes (onnx_ir.passes.common._c_api_utils); the larger ones become plain inputs.
CHECKER_INLINE_BYTES = 1000


class InlineSmallExternalTensorsPass(ir.passes.InPlacePass):
    """Load the external initializers the checker will see into memory. Otherwise such a tensor (a small
    norm weight of an fp16 model loaded with ir.load) reaches the checker as a reference to
    model.onnx_data, which it looks for in the working directory: "should be stored in model.onnx_data,
    but it is not regular file". Saving writes them out again like any other initializer."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and tensor.nbytes <= CHECKER_INLINE_BYTES:
                value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name)
                modified = True
        return ir.passes.PassResult(model, modified)


def run_passes(model: ir.Model, rules: list[pattern.RewriteRule]) -> ir.Model:
    manager = ir.passes.PassManager([
        RewritePass(pattern.RewriteRuleSet(rules)),
        common.RemoveUnusedNodesPass(),  # also drops initializers nothing reads any more
        common.RemoveUnusedOpsetsPass(),
        InlineSmallExternalTensorsPass(),
        common.CheckerPass(),
    ])
    return manager(model).model


def tagged_weights(model: ir.Model) -> dict[str, int]:
    """module name -> number of MatMul/Gemm nodes that read its dense weight. The rewriter copies the
    matched node's metadata (the module tag) onto the low-rank pair, which is therefore excluded."""
    counts: dict[str, int] = {}
    for node in linear_nodes(model.graph):
        module = None if LOWRANK_KEY in node.metadata_props else tagged_module(node)
        if module is not None:
            counts[module] = counts.get(module, 0) + 1
    return counts


def rewritten_modules(model: ir.Model) -> set[str]:
    return {node.metadata_props[LOWRANK_KEY] for node in model.graph if LOWRANK_KEY in node.metadata_props}


def rewrite_lowrank(model: ir.Model, factors: Mapping[str, LowRankFactors]) -> int:
    """Replace each compressed module's dense MatMul/Gemm by two low-rank MatMuls, in place.
    -> the number of modules rewritten (== len(factors), or an error)."""
    dense = tagged_weights(model)
    missing = sorted(set(factors) - set(dense))
    if missing:
        raise RewriteError(f"{len(missing)} compressed module(s) have no dense weight in the ONNX graph, "
                           f"e.g. {missing[0]}: the graph does not come from this model's dense export")
    shared = sorted(m for m in factors if dense[m] > 1)
    if shared:
        raise RewriteError(f"{shared[0]}: its weight feeds {dense[shared[0]]} nodes; cannot rewrite a shared weight")
    run_passes(model, lowrank_rules(factors))
    left = sorted(set(factors) & set(tagged_weights(model)))
    if left:
        raise RewriteError(f"{len(left)} compressed module(s) still dense after the rewrite, e.g. {left[0]}")
    done = rewritten_modules(model) & set(factors)
    if len(done) != len(factors):  # unreachable unless a rule misbehaves; never report a wrong count
        raise RewriteError(f"rewrote {len(done)} of {len(factors)} compressed modules")
    return len(done)
