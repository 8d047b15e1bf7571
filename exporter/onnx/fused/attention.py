"""Self-attention with the KV cache as ORT's GroupQueryAttention.

    q, k, v = linears(x)                         (each may be a low-rank pair; biases as Adds)
    [q, k = per-head RMSNorm]                    Qwen3
    [q, k = RotaryEmbedding(·, position_ids)]    Llama family; positions come from the graph input, as in PyTorch
    out, present.k, present.v = GroupQueryAttention(q, k, v, past.k, past.v, seqlens_k, total_length)
    -> o_proj's matmul and its bias (the caller folds the bias into the next SkipLayerNorm)

The cache is [batch, kv_heads, length, head_size]; GQA appends the new keys and values to the past ones
(or writes in place when past and present share one buffer, as onnxruntime-genai runs it).
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import torch.nn as nn

from .family import Family
from .graph import MS, GraphBuilder
from .linear import Precision, bias, linear, matmul
from .norms import normalize, write_norm


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_size: int
    window: int  # sliding window (keys), -1 for none

    @classmethod
    def of(cls, config) -> "AttentionShape":
        heads = config.num_attention_heads
        window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        return cls(heads, getattr(config, "num_key_value_heads", None) or heads,
                   getattr(config, "head_dim", None) or config.hidden_size // heads, window or -1)


@dataclass
class AttentionInputs:
    """Graph values every layer's attention reads."""
    position_ids: ir.Value
    seqlens_k: ir.Value  # int32 [batch]: valid tokens - 1 (past + new)
    total_length: ir.Value  # int32 scalar: the attention mask's length
    cos: ir.Value | None
    sin: ir.Value | None


def head_norm(b: GraphBuilder, x: ir.Value, norm: nn.Module, name: str, p: Precision) -> ir.Value:
    """RMSNorm over each head's features: [B, S, H·D] → [B, S, H, D] → norm → back."""
    per_head = b.op("Reshape", [x, b.constant(f"{name}/shape_heads", [0, 0, -1, norm.weight.shape[0]])],
                    f"/{name}/Reshape")
    normed = normalize(b, per_head, write_norm(b, norm, name, "rms", p))
    return b.op("Reshape", [normed, b.constant(f"{name}/shape_flat", [0, 0, -1])], f"/{name}/Reshape_back")


def attention(b: GraphBuilder, layer: nn.Module, prefix: str, x: ir.Value, past: tuple[ir.Value, ir.Value],
              present: tuple[ir.Value, ir.Value], shape: AttentionShape, inputs: AttentionInputs, family: Family,
              p: Precision) -> tuple[ir.Value, ir.Value | None]:
    """-> (o_proj output without its bias, o_proj's bias or None). `prefix`: the layer's module name."""
    q, k, v = (linear(b, layer.get_submodule(path), f"{prefix}.{path}", x, p)
               for path in (family.q, family.k, family.v))
    if family.qk_norm:
        attn = layer.get_submodule(family.attn)
        q = head_norm(b, q, attn.q_norm, f"{prefix}.{family.attn}.q_norm", p)
        k = head_norm(b, k, attn.k_norm, f"{prefix}.{family.attn}.k_norm", p)
    if family.rotary:
        q, k = (b.op("RotaryEmbedding", [t, inputs.position_ids, inputs.cos, inputs.sin],
                     f"/{prefix}.{family.attn}/{which}_rotary/RotaryEmbedding", {"interleaved": 0}, domain=MS)
                for which, t in (("q", q), ("k", k)))
    attrs = {"num_heads": shape.heads, "kv_num_heads": shape.kv_heads, "local_window_size": shape.window,
             "do_rotary": 0}
    out = b.op("GroupQueryAttention", [q, k, v, past[0], past[1], inputs.seqlens_k, inputs.total_length],
               f"/{prefix}.{family.attn}/GroupQueryAttention", attrs, domain=MS,
               outputs=[None, *present])[0]
    o = layer.get_submodule(family.o)
    name = f"{prefix}.{family.o}"
    return matmul(b, o, name, out, p), bias(b, o, name, p)
