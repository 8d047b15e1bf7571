"""A small graph builder on onnx-ir: nodes with readable names, weights streamed to the external data
file (the graph holds references only), and inline constants for the few small shape/index tensors."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import torch

from .weight_file import WeightFile

MS = "com.microsoft"  # ONNX Runtime's contrib-op domain


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A weight as the numpy array the graph stores (numpy has no bfloat16: such a weight goes through float32)."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


class GraphBuilder:
    def __init__(self, weights: WeightFile, opset: int):
        self.weights, self.opset = weights, opset
        self.nodes: list[ir.Node] = []
        self.initializers: dict[str, ir.Value] = {}
        self._names: set[str] = set()

    def _unique(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"two nodes or values named {name!r}: the builder names each exactly once")
        self._names.add(name)
        return name

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], name: str, attrs: dict | None = None,
           domain: str = "", outputs: int | Sequence[ir.Value | str | None] = 1, metadata: dict | None = None):
        """One node named `name`. outputs: a count, or per output a value (a graph output, a placeholder),
        None (a new value `name/output_i`) or "" (an optional output left out). -> the output value, or a
        tuple when there are several."""
        if isinstance(outputs, int):
            outputs = [None] * outputs
        outputs = [ir.Value(name=self._unique(f"{name}/output_{i}")) if out is None
                   else ir.Value(name="") if out == "" else out for i, out in enumerate(outputs)]
        node = ir.Node(domain, op_type, inputs, attributes=[ir.convenience.convert_attribute(k, v)
                                                            for k, v in (attrs or {}).items()],
                       outputs=outputs, name=self._unique(name), metadata_props=dict(metadata or {}))
        self.nodes.append(node)
        return node.outputs[0] if len(node.outputs) == 1 else tuple(node.outputs)

    def _initializer(self, tensor: ir.TensorProtocol) -> ir.Value:
        value = ir.Value(name=self._unique(tensor.name), shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        self.initializers[value.name] = value
        return value

    def weight(self, name: str, array: np.ndarray) -> ir.Value:
        """A weight: its bytes are written to the data file now; the graph keeps a reference."""
        return self._initializer(self.weights.add(name, array))

    def constant(self, name: str, array) -> ir.Value:
        """A small constant kept inside model.onnx (shapes, indices, scalars)."""
        array = np.asarray(array)
        if array.nbytes > 1024:
            raise ValueError(f"constant {name} has {array.nbytes} bytes: weights go through weight()")
        return self._initializer(ir.tensor(array, name=name))

    def graph(self, inputs: list[ir.Value], outputs: list[ir.Value]) -> ir.Graph:
        graph = ir.Graph(inputs, outputs, nodes=self.nodes, initializers=list(self.initializers.values()),
                         opset_imports={"": self.opset, MS: 1}, name="decoder")
        graph.sort()  # nodes were added per call (embeddings, layers, head), not necessarily in order
        return graph
