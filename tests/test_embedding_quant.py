"""exporter/onnx/fused/embedding.py: the embedding table as GatherBlockQuantized, in MatMulNBits' B layout.

dequantized_table is bit for bit what ONNX Runtime's GatherBlockQuantized returns for every id (int4, int8,
symmetric and not, float32 and float16, a hidden size that is and one that is not a multiple of the block);
a tied table is one initializer read by GatherBlockQuantized (through a Reshape) and by the lm_head's
MatMulNBits, and both agree with the dequantized table."""
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from exporter.config import Quantization
from exporter.onnx.fused.embedding import (
    QuantizedEmbedding,
    dequantized_table,
    embedding_quantization,
    pack_table,
    quantized_gather,
    round_embedding_,
)
from exporter.onnx.fused.graph import GraphBuilder
from exporter.onnx.fused.weight_file import WeightFile

VOCAB = 200
ONNX_TYPE = {np.float32: ir.DataType.FLOAT, np.float16: ir.DataType.FLOAT16}


def table(hidden: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((VOCAB, hidden)).astype(np.float32)


def value(name: str, dtype: ir.DataType, dims: list) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(dtype))


def session(b: GraphBuilder, inputs: list[ir.Value], outputs: list[ir.Value], folder) -> ort.InferenceSession:
    b.weights.close()
    ir.save(ir.Model(b.graph(inputs, outputs), ir_version=10), folder / "model.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])


def all_ids() -> np.ndarray:
    return np.arange(VOCAB, dtype=np.int64).reshape(2, -1)  # [batch, sequence]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("hidden", [64, 72])  # 72: padded to 3 blocks of 32, sliced back
@pytest.mark.parametrize("bits,symmetric", [(4, True), (8, True), (4, False), (8, False)])
def test_dequantized_table_is_what_ort_gathers(bits, symmetric, hidden, dtype, tmp_path):
    q = Quantization(bits=bits, block_size=32, symmetric=symmetric, accuracy_level=0)
    weights = table(hidden)
    b = GraphBuilder(WeightFile(tmp_path), 18)
    ids = value("ids", ir.DataType.INT64, ["batch", "sequence"])
    out = quantized_gather(b, weights, ids, q, dtype, "model.embed_tokens")
    out.name, out.type = "rows", ir.TensorType(ONNX_TYPE[dtype])
    kinds = [node.op_type for node in b.nodes]
    assert kinds == ["GatherBlockQuantized"] + (["Slice"] if hidden % 32 else [])  # its own table: no Reshape
    gather = b.nodes[0]
    assert {k: a.value for k, a in gather.attributes.items()} == {"gather_axis": 0, "quantize_axis": 1,
                                                                   "block_size": 32, "bits": bits}
    assert len(gather.inputs) == (3 if symmetric else 4)  # no zero points when symmetric
    rows, = session(b, [ids], [out], tmp_path).run(None, {"ids": all_ids()})
    expected = dequantized_table(weights, q, dtype)
    assert rows.dtype == dtype and rows.shape == (2, VOCAB // 2, hidden)
    assert np.array_equal(rows.reshape(VOCAB, hidden), expected)  # bit for bit
    step = 2 ** (bits - 1) - 1  # the rounding is the quantizer's: within half a step of the block's largest
    assert np.abs(expected.astype(np.float32) - weights).max() <= np.abs(weights).max() / step


@pytest.mark.parametrize("bits", [4, 8])
def test_one_table_serves_the_gather_and_the_tied_lm_head(bits, tmp_path):
    """Tied, embedding at the head's bits: one packed initializer (3-D, MatMulNBits' B) read by the lm_head's
    MatMulNBits and, through a Reshape, by GatherBlockQuantized; both compute with dequantized_table."""
    hidden = 72
    q = Quantization(bits=4, block_size=32, accuracy_level=0, head_bits=bits)
    config = SimpleNamespace(tie_word_embeddings=True)  # all the decision reads
    embedding = torch.nn.Embedding(VOCAB, hidden)
    embedding.weight.data = torch.from_numpy(table(hidden, seed=1))
    lm_head = torch.nn.Linear(hidden, VOCAB, bias=False)
    lm_head.weight = embedding.weight
    b = GraphBuilder(WeightFile(tmp_path), 18)
    tables = QuantizedEmbedding(b, config, q, np.float32)
    assert tables.shared and tables.q.bits == bits
    ids = value("ids", ir.DataType.INT64, ["batch", "sequence"])
    x = value("x", ir.DataType.FLOAT, ["rows", hidden])
    logits = tables.head(lm_head, x)  # the head first: the table is written once, whichever comes first
    rows = tables.gather(embedding.weight, ids)
    for out, name in ((rows, "rows"), (logits, "logits")):
        out.name, out.type = name, ir.TensorType(ir.DataType.FLOAT)
    run = session(b, [ids, x], [rows, logits], tmp_path)
    graph = onnx.load(tmp_path / "model.onnx", load_external_data=False).graph
    assert sorted(n.op_type for n in graph.node) == ["GatherBlockQuantized", "MatMulNBits", "Reshape", "Slice"]
    packed = [t for t in graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert len(packed) == 1 and list(packed[0].dims) == [VOCAB, 3, 32 * bits // 8]
    readers = {n.op_type for n in graph.node if packed[0].name in n.input}
    assert readers == {"Reshape", "MatMulNBits"}
    scales = next(n.input[2] for n in graph.node if n.op_type == "MatMulNBits")
    assert scales == next(n.input[2] for n in graph.node if n.op_type == "GatherBlockQuantized")
    inputs = np.random.default_rng(2).standard_normal((5, hidden)).astype(np.float32)
    got_rows, got_logits = run.run(None, {"ids": all_ids(), "x": inputs})
    expected = dequantized_table(embedding.weight.detach().numpy(), embedding_quantization(q))
    assert np.array_equal(got_rows.reshape(VOCAB, hidden), expected)
    np.testing.assert_allclose(got_logits, inputs @ expected.T, rtol=0, atol=1e-4)


@pytest.mark.parametrize("tied,bits,shared", [(True, 8, True), (True, 4, False), (False, None, False)])
def test_the_table_is_shared_only_when_tied_at_the_heads_bits(tied, bits, shared, tmp_path):
    q = Quantization(bits=4, block_size=32, head_bits=8)
    config = SimpleNamespace(tie_word_embeddings=tied)
    b = GraphBuilder(WeightFile(tmp_path), 18)
    tables = QuantizedEmbedding(b, config, q, np.float32, bits=bits)
    assert tables.shared == shared and tables.q.bits == (bits or q.head_bits)
    lm_head = torch.nn.Linear(64, VOCAB, bias=False)
    assert (tables.head(lm_head, value("x", ir.DataType.FLOAT, [1, 64])) is None) == (not shared)
    tables.gather(lm_head.weight, value("ids", ir.DataType.INT64, [1, 1]))
    packed = next(v for v in b.initializers.values() if v.dtype == ir.DataType.UINT8)
    assert len(packed.shape) == (3 if shared else 2)  # the embedding's own table needs no Reshape


def test_pack_table_is_the_lm_heads_matmulnbits_weight():
    """The embedding packs its [vocab, hidden] table exactly as the lm_head's MatMulNBits packs x·tableᵀ."""
    from exporter.onnx.fused.quantize import quantize_weight
    q = Quantization(bits=4, block_size=32)
    weights = table(64)
    w, head = pack_table(weights, q), quantize_weight(weights.T, q, np.float32)
    assert (w.k, w.n) == (64, VOCAB) and np.array_equal(w.packed, head.packed)
    assert np.array_equal(w.scales, head.scales)


def test_a_shared_table_takes_the_codes_of_a_head_on_its_own_grid(tmp_path):
    """A head the layer loop put on its grid (GPTQ: scales attached, weight on them) packs the shared table
    with its codes, and the embedding reads the head's values, in the graph as in the PyTorch reference."""
    quantized = pytest.importorskip("exporter.model.quantized")
    q, hidden = Quantization(bits=4, block_size=32, accuracy_level=0, head_bits=8), 64
    weights = table(hidden, seed=3)
    scales = 1.25 * pack_table(weights, q.head()).scales  # a grid that is not round-to-nearest's
    codes = np.clip(np.round(weights / np.repeat(scales, 32, axis=1)), -128, 127)
    embedding, lm_head = torch.nn.Embedding(VOCAB, hidden), torch.nn.Linear(hidden, VOCAB, bias=False)
    embedding.weight.data = torch.from_numpy(weights)
    lm_head.weight.data = torch.from_numpy((codes * np.repeat(scales, 32, axis=1)).astype(np.float32))
    quantized.set_scales(lm_head, torch.from_numpy(scales))
    b = GraphBuilder(WeightFile(tmp_path), 18)
    tables = QuantizedEmbedding(b, SimpleNamespace(tie_word_embeddings=True), q, np.float32)
    ids, x = value("ids", ir.DataType.INT64, [1, VOCAB]), value("x", ir.DataType.FLOAT, [1, hidden])
    logits, rows = tables.head(lm_head, x), tables.gather(embedding.weight, ids)
    for out, name in ((rows, "rows"), (logits, "logits")):
        out.name, out.type = name, ir.TensorType(ir.DataType.FLOAT)
    got, _ = session(b, [ids, x], [rows, logits], tmp_path).run(
        None, {"ids": np.arange(VOCAB, dtype=np.int64)[None], "x": np.zeros((1, hidden), np.float32)})
    assert np.array_equal(got[0], lm_head.weight.detach().numpy())
    assert not np.array_equal(got[0], dequantized_table(weights, embedding_quantization(q)))
    round_embedding_(embedding, embedding_quantization(q), lm_head)  # the reference's table: the head's values
    assert torch.equal(embedding.weight, lm_head.weight)
    late = QuantizedEmbedding(GraphBuilder(WeightFile(tmp_path / "late"), 18), SimpleNamespace(tie_word_embeddings=True),
                              q, np.float32)
    late.gather(torch.from_numpy(weights), ids)
    with pytest.raises(RuntimeError, match="add the lm_head first"):
        late.head(lm_head, x)
