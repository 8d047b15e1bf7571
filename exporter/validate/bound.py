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
