"""Which PyTorch linear each MatMul/Gemm weight of an exported graph came from.

The tag is node metadata (MODULE_KEY = module name), written once on the dense graph, so a later rewrite
needs only the graph and the factors. Two ways to find it, in order:
  1. by name: torch.onnx's dynamo exporter keeps the module path in `pkg.torch.onnx.name_scopes`;
  2. by value: the weight initializer equals the module's weight (in the graph's orientation and dtype),
     for exporters or optimisations that lost the scope. An ambiguous value (two modules, same weight)
     is never guessed.
"""
from __future__ import annotations

import ast
import hashlib
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graph_rewrite.tags import MODULE_KEY

log = logging.getLogger(__name__)

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
LINEAR_OPS = ("MatMul", "Gemm")


def constant_weight(node: ir.Node) -> ir.Value | None:
    """The node's B input when it is a constant (initializer), else None."""
    if node.op_type not in LINEAR_OPS or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    weight = node.inputs[1]
    return weight if weight.const_value is not None else None


def holds_out_in(node: ir.Node) -> bool:
    """Gemm(transB=1) holds the weight as out×in (nn.Linear's layout); MatMul and Gemm(transB=0) as in×out."""
    return node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1


def weight_out_in(node: ir.Node, array: np.ndarray) -> np.ndarray:
    return array if holds_out_in(node) else array.T


def out_in_shape(node: ir.Node) -> tuple | None:
    shape = constant_weight(node).shape
    if shape is None or not shape.is_static():
        return None
    shape = tuple(shape.numpy())
    return shape if holds_out_in(node) else shape[::-1]


def scope_module(node: ir.Node, prefix: str = "") -> str | None:
    raw = node.metadata_props.get(SCOPES_KEY)
    if not raw:
        return None
    scopes = ast.literal_eval(raw)  # a Python list literal written by the exporter
    if len(scopes) < 2:
        return None
    module = scopes[-2]  # the last entry is the op itself, the one before it the module that called it
    return module[len(prefix):] if prefix and module.startswith(prefix) else module


def linear_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [node for node in graph if constant_weight(node) is not None]


def _fingerprint(array: np.ndarray) -> tuple:
    array = np.ascontiguousarray(array)
    return array.shape, str(array.dtype), hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest()


def tag_linears(model: ir.Model, linears: Mapping[str, np.ndarray], prefix: str = "") -> dict[str, str]:
    """Tag every MatMul/Gemm whose weight is one of `linears` (module name -> out×in weight, read lazily)
    with MODULE_KEY. -> module name -> node name."""
    found: dict[str, str] = {}
    untagged = []
    for node in linear_nodes(model.graph):
        name = scope_module(node, prefix)
        if name in linears and name not in found and out_in_shape(node) == tuple(linears[name].shape):
            node.metadata_props[MODULE_KEY] = name
            found[name] = node.name
        else:
            untagged.append(node)
    remaining = [name for name in linears if name not in found]
    if untagged and remaining:
        by_value: dict[tuple, list[ir.Node]] = {}
        for node in untagged:
            array = constant_weight(node).const_value.numpy()
            by_value.setdefault(_fingerprint(weight_out_in(node, array)), []).append(node)
        dtypes = {key[1] for key in by_value}
        modules: dict[tuple, list[str]] = {}
        for name in remaining:
            weight = linears[name]
            for dtype in dtypes:
                modules.setdefault(_fingerprint(weight.astype(dtype, copy=False)), []).append(name)
        for key, names in modules.items():
            nodes = by_value.get(key, [])
            if len(nodes) == 1 and len(names) == 1:
                nodes[0].metadata_props[MODULE_KEY] = names[0]
                found[names[0]] = nodes[0].name
            elif nodes:
                log.warning("%s: %d graph weight(s) and %d module(s) share one value; not tagged",
                            ", ".join(names), len(nodes), len(names))
    return found


def tagged_module(node: ir.Node) -> str | None:
    return node.metadata_props.get(MODULE_KEY)
