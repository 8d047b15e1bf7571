"""The token embedding table as ONNX Runtime's GatherBlockQuantized (com.microsoft), in MatMulNBits' B layout,
so that a tied lm_head and the embedding can read one packed table.

    table [vocab, hidden]  →  quantize_weight(tableᵀ): K = hidden, N = vocab, the lm_head's MatMulNBits B
                              packed uint8 [vocab, blocks, block_size·bits/8], scales [vocab, blocks]

What ONNX Runtime (1.32, CPU) requires of GatherBlockQuantized (checked by tests/test_embedding_quant.py):
  - data uint8 with bits 4 or 8 (8/bits codes a byte, the first in the low bits: MatMulNBits' packing),
    gather_axis 0, quantize_axis the last axis, block_size as the quantizer's; scales of data's rank.
  - MatMulNBits refuses any B but the 3-D [N, blocks, blob] and any scales but [N, blocks] (or flat), and
    GatherBlockQuantized wants scales of data's rank: the 3-D B goes to it through a Reshape to
    [vocab, blocks·blob] (quantize_axis 1, the scales as they are), as onnxruntime-genai's builder does for
    its tied int4 embeddings. ORT's constant folding turns that Reshape into a second in-memory copy of the
    table: sharing saves the bytes on disk, not memory. A table read by GatherBlockQuantized alone is stored
    2-D, no Reshape.
  - no zero points (symmetric): uint8 data's default zero point is 2^(bits−1), MatMulNBits' own; with them,
    the same packed [vocab, ceil(blocks·bits/8)] array MatMulNBits reads.
  - the output has blocks·block_size columns: a hidden size that is not a multiple of the block is sliced.

Bits: the embedding's default is the lm_head's (q.head()); tied (config.tie_word_embeddings) at the same bits,
the lm_head's MatMulNBits reads the embedding's packed table (QuantizedEmbedding.head); otherwise the
embedding has its own table and the lm_head is the writer's usual linear. A shared table is packed from the
lm_head when it comes first: a head the layer loop put on its own grid (GPTQ, exporter/model/quantized.py)
gives the table its codes, and the embedding reads them (round_embedding_ does the same for the reference).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from torch import nn

from graph_rewrite.tags import MODULE_KEY

from ...config import Quantization
from ...model.quantized import scales_of
from .graph import MS, GraphBuilder, to_numpy
from .quantize import NBitsWeight, dequantize, quantize_weight


@dataclass
class PackedTable:
    """A table's quantized arrays and, once written, their initializers (MatMulNBits' B layout)."""
    weight: NBitsWeight  # K = hidden, N = vocab
    q: Quantization
    packed: ir.Value  # uint8 [vocab, blocks, blob] (shared) or [vocab, blocks·blob] (the embedding's own)
    scales: ir.Value  # [vocab, blocks]
    zero_points: ir.Value | None


def embedding_quantization(q: Quantization, bits: int | None = None) -> Quantization:
    """The embedding table's setting: `bits` (default the lm_head's), the rest as q's."""
    head = q.head()
    return Quantization(head.bits if bits is None else bits, q.block_size, q.symmetric, q.accuracy_level,
                        q.head_bits)


def grid_of(linear: nn.Module):
    """The scales [out, blocks] of the grid the layer loop put `linear` on (exporter/model/quantized.py), or
    None for a float weight."""
    return scales_of(linear)


def pack_table(table_vocab_hidden: np.ndarray, q: Quantization, scale_dtype=np.float32, grid=None) -> NBitsWeight:
    """The table quantized as a MatMulNBits B (the lm_head's x·tableᵀ): ONNX Runtime's block quantizer, or
    the codes of `grid` (a head's scales [vocab, blocks], the table already on it)."""
    w_kn = np.asarray(table_vocab_hidden, dtype=np.float32).T
    return quantize_weight(w_kn, q, scale_dtype) if grid is None else quantize_weight(w_kn, q, scale_dtype, grid)


def dequantized_table(table: np.ndarray | NBitsWeight, q: Quantization, dtype=np.float32) -> np.ndarray:
    """[vocab, hidden] in `dtype`: what GatherBlockQuantized returns for every id (and what the shared
    MatMulNBits computes with). A float table is first packed with scales in `dtype`, as the graph is."""
    w = table if isinstance(table, NBitsWeight) else pack_table(table, q, dtype)
    return np.ascontiguousarray(dequantize(w, q).T).astype(dtype)


def write_table(b: GraphBuilder, name: str, w: NBitsWeight, q: Quantization, shared: bool) -> PackedTable:
    """The initializers `name`.weight_q{bits} / _scales / _zero_points: the MatMulNBits B layout when the
    lm_head shares it, else [vocab, blocks·blob] as GatherBlockQuantized reads it directly."""
    packed = w.packed if shared else w.packed.reshape(w.n, -1)
    zero_points = None if w.zero_points is None else b.weight(f"{name}.weight_zero_points", w.zero_points)
    return PackedTable(w, q, b.weight(f"{name}.weight_q{q.bits}", packed), b.weight(f"{name}.weight_scales", w.scales),
                       zero_points)


def quantized_gather(b: GraphBuilder, table: np.ndarray | PackedTable, ids: ir.Value, q: Quantization, dtype,
                     name: str, out: ir.Value | None = None) -> ir.Value:
    """Rows `ids` of the table, dequantized: GatherBlockQuantized [.., hidden] in `dtype`. `table`: a float
    [vocab, hidden] array (packed and written here as `name`.weight_q{bits}), or a written PackedTable (a 3-D
    one, shared with a MatMulNBits, is read through a Reshape). `name`: the module's (model.embed_tokens);
    nodes are /model/embed_tokens/... `out`: the value to write the result into (a placeholder)."""
    if not isinstance(table, PackedTable):
        table = write_table(b, name, pack_table(table, q, dtype), q, shared=False)
    w, prefix = table.weight, "/" + name.replace(".", "/")
    data = table.packed
    if len(data.shape) == 3:
        flat = b.constant(f"{prefix}/packed_2d", np.array([w.n, -1], np.int64))
        data = b.op("Reshape", [data, flat], f"{prefix}/Reshape")
    inputs = [data, ids, table.scales] + ([] if table.zero_points is None else [table.zero_points])
    attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": q.block_size, "bits": q.bits}
    padded = w.packed.shape[1] * q.block_size != w.k
    rows = b.op("GatherBlockQuantized", inputs, f"{prefix}/GatherBlockQuantized", attrs, domain=MS,
                outputs=[None if padded or out is None else out])
    if not padded:
        return rows
    starts, ends, axes = (b.constant(f"{prefix}/slice_{k}", np.array([v], np.int64))
                          for k, v in (("start", 0), ("end", w.k), ("axis", -1)))
    return b.op("Slice", [rows, starts, ends, axes], f"{prefix}/Slice", outputs=[out])


def shared_matmul(b: GraphBuilder, table: PackedTable, x: ir.Value, name: str = "lm_head") -> ir.Value:
    """x·tableᵀ as MatMulNBits on the table's own initializers (the 3-D B), tagged as `name`'s matmul."""
    w, q = table.weight, table.q
    inputs = [x, table.packed, table.scales] + ([] if table.zero_points is None else [table.zero_points])
    attrs = {"K": w.k, "N": w.n, "bits": q.bits, "block_size": q.block_size}
    if q.accuracy_level:
        attrs["accuracy_level"] = q.accuracy_level
    return b.op("MatMulNBits", inputs, f"/{name}/MatMulNBits", attrs, domain=MS, metadata={MODULE_KEY: name})


def shares_table(config, q: Quantization, bits: int | None = None) -> bool:
    """One packed table for the embedding and the lm_head: tied, the embedding at the head's bits."""
    return bool(getattr(config, "tie_word_embeddings", False)) and embedding_quantization(q, bits).bits == q.head_bits


class QuantizedEmbedding:
    """The writer's decision, made once from the config (shares_table): one packed table read by
    GatherBlockQuantized and by the lm_head's MatMulNBits (whichever of gather() and head() comes first writes
    it; head() first, so that a head on its own grid gives it its codes), or the embedding's own packed table
    and head() returns None (the writer writes its lm_head as usual)."""

    def __init__(self, b: GraphBuilder, config, q: Quantization, dtype, bits: int | None = None,
                 name: str = "model.embed_tokens"):
        self.b, self.dtype, self.name = b, dtype, name
        self.q = embedding_quantization(q, bits)
        self.shared = shares_table(config, q, bits)
        self._table: PackedTable | None = None

    def _packed(self, weight, grid=None) -> PackedTable:
        if self._table is None:
            w = pack_table(to_numpy(weight), self.q, self.dtype, grid)
            self._table = write_table(self.b, self.name, w, self.q, shared=self.shared)
        elif (self._table.weight.n, self._table.weight.k) != tuple(weight.shape):
            raise ValueError(f"tied lm_head {tuple(weight.shape)} does not match the embedding table "
                             f"{(self._table.weight.n, self._table.weight.k)}")
        elif grid is not None:
            raise RuntimeError("the shared table was packed from the embedding before the lm_head, which has its "
                               "own grid: add the lm_head first")
        return self._table

    def gather(self, weight, ids: ir.Value, out: ir.Value | None = None) -> ir.Value:
        """The embedding lookup of `weight` [vocab, hidden] (the nn.Embedding's) at `ids`."""
        return quantized_gather(self.b, self._packed(weight), ids, self.q, self.dtype, self.name, out)

    def head(self, lm_head: nn.Linear, x: ir.Value) -> ir.Value | None:
        """The tied lm_head on the shared table (+ its bias, if any); None when the table is not shared."""
        if not self.shared:
            return None
        logits = shared_matmul(self.b, self._packed(lm_head.weight, grid_of(lm_head)), x)
        if lm_head.bias is None:
            return logits
        bias = self.b.weight("lm_head.bias", to_numpy(lm_head.bias).astype(self.dtype))
        return self.b.op("Add", [logits, bias], "/lm_head/Add")


def round_embedding_(embedding: nn.Embedding, q: Quantization, head: nn.Linear | None = None) -> None:
    """In place: the embedding table becomes what GatherBlockQuantized returns (float32 scales, as the
    PyTorch references of quantized exports use). `head`: the lm_head when it shares the table (shares_table);
    on its own grid, its values are the table's."""
    import torch
    with torch.no_grad():
        if head is not None and grid_of(head) is not None:
            embedding.weight.copy_(head.weight.to(embedding.weight.dtype))
            return
        back = dequantized_table(to_numpy(embedding.weight), q)
        embedding.weight.copy_(torch.from_numpy(back).to(embedding.weight.dtype))
