"""The memory-bandwidth bound on the decode speedup.

Decoding one token reads every weight once (at batch sizes where decode is memory-bound), so the
speedup of the compressed model cannot exceed dense weight bytes / compressed weight bytes. Embedding
tables are the exception: a token reads one row of them, unless the table doubles as the output
projection (tied), which reads all of it. The KV cache and activations are read equally by both models,
so leaving them out makes this an upper bound."""
from __future__ import annotations

import torch.nn as nn


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters one decoded token reads."""
    output = model.get_output_embeddings()
    output_weight = output.weight if output is not None else None
    row_only = {id(m.weight) for m in model.modules()
                if isinstance(m, nn.Embedding) and m.weight is not output_weight}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in row_only)


def compressed_weight_bytes(dense_bytes: int, layers: dict, element_size: int) -> int:
    """Dense bytes minus what each factorized m×n matrix saves: (m·n − r(m+n)) elements.
    `layers` is report.json's {name: {"rank", "shape": [out, in]}}."""
    saved = 0
    for name, rec in layers.items():
        out_f, in_f = rec["shape"]
        if rec["rank"] * (out_f + in_f) >= out_f * in_f:
            raise ValueError(f"{name}: rank {rec['rank']} does not save parameters on a {out_f}×{in_f} matrix")
        saved += out_f * in_f - rec["rank"] * (out_f + in_f)
    return dense_bytes - saved * element_size


def bound_decode_speedup(dense_bytes: int, compressed_bytes: int) -> float:
    if compressed_bytes <= 0:  # guard: a model that reads no weight has no bandwidth bound
        raise ValueError(f"compressed weight bytes must be positive, got {compressed_bytes}")
    return dense_bytes / compressed_bytes


def bound_block(dense_model: nn.Module, layers: dict) -> dict:
    element_size = next(dense_model.parameters()).element_size()
    dense = decode_weight_bytes(dense_model)
    compressed = compressed_weight_bytes(dense, layers, element_size)
    return {"bound_decode_speedup": bound_decode_speedup(dense, compressed),
            "weight_bytes_per_token": {"dense": dense, "compressed": compressed, "element_size": element_size}}


# Tables a decoded token reads one row of: (op type, input index) of the consumer.
ROW_READS = {("Gather", 0), ("GatherBlockQuantized", 0), ("GatherBlockQuantized", 2), ("GatherBlockQuantized", 3),
             ("RotaryEmbedding", 2), ("RotaryEmbedding", 3), ("GroupQueryAttention", 7), ("GroupQueryAttention", 8)}


def graph_decode_weight_bytes(onnx_path) -> int:
    """Bytes of initializers one decoded token reads, counted on the exported graph itself (so quantized
    weights count as stored: packed blocks, scales, zero points). A table read only by row lookups
    (embeddings, rotary caches) counts one row; anything else is read in full."""
    import numpy as np
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    uses: dict[str, set] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            uses.setdefault(name, set()).add((node.op_type, index))
    total = 0
    for tensor in graph.initializer:
        if tensor.name not in uses:
            continue
        dims = list(tensor.dims)
        nbytes = int(np.prod(dims, dtype=np.int64)) * np.dtype(tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        rows_only = dims and uses[tensor.name] <= ROW_READS
        total += nbytes // dims[0] if rows_only else nbytes
    return total


def graph_bound_block(dense_onnx, compressed_onnx) -> dict:
    """The bound counted on the two graphs: what a quantized export needs (its bytes are not the model's)."""
    dense, compressed = graph_decode_weight_bytes(dense_onnx), graph_decode_weight_bytes(compressed_onnx)
    return {"bound_decode_speedup": bound_decode_speedup(dense, compressed),
            "weight_bytes_per_token": {"dense": dense, "compressed": compressed, "counted_on": "onnx graphs"}}
