"""benchmarks/quality/front.py: its one evaluation loop gives exporter.validate.perplexity's perplexity on a tiny
model's graphs in both IO conventions (our fused graph: position_ids, static KV dims; onnxruntime-genai's
builder: no position_ids, a symbolic head size), and its weight bytes per decoded token on float and quantized
graphs (a table read by row lookups counts one row, also through a Reshape; a table the lm_head shares counts in
full once; packed 4-bit weights count as stored; ONNX's own 4-bit type half a byte an element)."""
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_model
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python -m pytest` in the root puts it there; a bare `pytest` does not
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import front
from exporter.config import Quantization
from exporter.onnx.fused import build_onnx
from exporter.validate.bound import decode_weight_bytes, graph_decode_weight_bytes
from exporter.validate.ort_session import OrtDecoder
from exporter.validate.perplexity import perplexity, torch_logits

WINDOW = 32


def tokens(count: int = 4 * WINDOW + 5) -> torch.Tensor:  # a remainder that eval_windows drops
    return torch.randint(3, 128, (count,), generator=torch.Generator().manual_seed(7))


def test_loop_matches_exporter_perplexity_on_our_fused_graph(tmp_path):
    model = tiny_model("llama")
    path = build_onnx(model, char_tokenizer(), tmp_path)
    decoder = front.open_decoder(tmp_path)
    assert decoder.position_ids and isinstance(decoder.head_size, int)
    got = front.perplexity_of(decoder, tokens(), WINDOW)
    assert got["predicted_tokens"] == 4 * (WINDOW - 1)
    same_graph = perplexity(OrtDecoder.load(path, threads=1).logits_fn(), tokens(), WINDOW, progress=False)
    assert got["ppl"] == pytest.approx(same_graph, rel=1e-6)
    assert got["ppl"] == pytest.approx(perplexity(torch_logits(model), tokens(), WINDOW, progress=False), rel=1e-4)
    speed = front.decode_speed(decoder, tokens()[:8], steps=4, repeats=1)
    assert len(speed["greedy_tokens"]) == 5 and speed["decode_tokens_s"] > 0


def builder_ready_model(folder: Path):
    """A tiny Llama saved as a folder for the builder, with an MLP width (96) other than the vocabulary (128):
    the builder takes any nn.Linear with vocab_size outputs for the lm_head (builders/base.py has_lm_head), so
    conftest's tiny Llama (intermediate_size = vocab_size = 128) comes out with a wrong graph."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM
    config = tiny_config("llama")
    config.intermediate_size, config.bos_token_id, config.eos_token_id = 96, 1, 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return model


def test_loop_matches_exporter_perplexity_on_the_builders_graph(tmp_path):
    """The real builder on a tiny Llama folder (float32): the loop reads the symbolic head size from
    genai_config.json, feeds no position_ids, and gives PyTorch's perplexity; the bytes are PyTorch's plus one
    row of each lookup table (embedding, cos and sin caches)."""
    model = builder_ready_model(tmp_path / "hf")
    hf = tmp_path / "hf"
    record = front.run_builder(hf, tmp_path / "b", "fp32", [], tmp_path / "cache")
    assert record["wall_s"] > 0 and record["command"].startswith("python -m onnxruntime_genai.models.builder -i ")
    assert front.run_builder(hf, tmp_path / "b", "fp32", [], tmp_path / "cache") == record  # cached
    decoder = front.open_decoder(tmp_path / "b")
    assert not decoder.position_ids and (decoder.kv_heads, decoder.head_size) == (4, 16)
    got = front.perplexity_of(decoder, tokens(), WINDOW)
    assert got["ppl"] == pytest.approx(perplexity(torch_logits(model), tokens(), WINDOW, progress=False), rel=1e-4)
    path = front.onnx_file(tmp_path / "b")
    config = model.config
    rows = config.hidden_size * 4 + 2 * (config.hidden_size // config.num_attention_heads // 2) * 4
    assert front.decode_weight_bytes(path) == decode_weight_bytes(model) + rows
    assert front.disk_bytes(path) == path.stat().st_size + (path.parent / "model.onnx.data").stat().st_size


def test_bytes_on_our_float_and_quantized_graphs_agree_with_bound(tmp_path):
    """On graphs without GatherBlockQuantized or 4-bit typed tensors the count is exporter.validate.bound's."""
    model = tiny_model("llama")
    for name, quantization in (("f32", None), ("int4", Quantization(bits=4, block_size=16))):
        path = build_onnx(model, char_tokenizer(), tmp_path / name, quantization=quantization)
        assert front.decode_weight_bytes(path) == graph_decode_weight_bytes(path)
        assert front.disk_bytes(path) == sum(p.stat().st_size for p in path.parent.glob("model.onnx*"))
    assert front.graph_facts(tmp_path / "int4" / "model.onnx")["nbits_settings"][0]["bits"] in (4, 8)


def test_bytes_of_a_builder_style_quantized_graph(tmp_path):
    """A hand-made graph in the builder's int4 layout: a MatMulNBits weight (packed uint8, full), an lm_head
    table shared with the embedding's Reshape -> GatherBlockQuantized (full, once), an embedding read only by
    GatherBlockQuantized through a Reshape (one row of data and scales), a float Gather table (one row), an
    INT4-typed tensor (half a byte an element), an unused tensor (nothing)."""
    def init(name, array):
        return numpy_helper.from_array(np.asarray(array), name)

    inits = [init("w_q4", np.zeros((8, 2, 16), np.uint8)), init("w_scales", np.ones((8, 2), np.float32)),
             init("head_q4", np.zeros((10, 2, 16), np.uint8)), init("head_scales", np.ones((10, 2), np.float32)),
             init("emb_q4", np.zeros((12, 2, 8), np.uint8)), init("emb_scales", np.ones((12, 1), np.float32)),
             init("shape", np.array([-1, 16], np.int64)), init("float_emb", np.ones((20, 4), np.float32)),
             helper.make_tensor("int4_w", TensorProto.INT4, [3, 5], [1] * 15), init("unused", np.ones(100, np.float32))]
    ms = "com.microsoft"
    nodes = [helper.make_node("MatMulNBits", ["x", "w_q4", "w_scales"], ["h"], domain=ms, K=64, N=8, bits=4, block_size=32),
             helper.make_node("MatMulNBits", ["h", "head_q4", "head_scales"], ["logits"], domain=ms, K=64, N=10),
             helper.make_node("Reshape", ["head_q4", "shape"], ["head_rows"]),
             helper.make_node("GatherBlockQuantized", ["head_rows", "ids", "head_scales"], ["e1"], domain=ms),
             helper.make_node("Reshape", ["emb_q4", "shape"], ["emb_rows"]),
             helper.make_node("GatherBlockQuantized", ["emb_rows", "ids", "emb_scales"], ["e2"], domain=ms),
             helper.make_node("Gather", ["float_emb", "ids"], ["e3"]),
             helper.make_node("DequantizeLinear", ["int4_w", "w_scales"], ["d"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
                                           helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), path)
    expected = (8 * 2 * 16 + 8 * 2 * 4          # MatMulNBits weight and scales, in full
                + 10 * 2 * 16 + 10 * 2 * 4      # the shared lm_head table and scales, in full once
                + 2 * 8 + 1 * 4                 # one row of the GatherBlockQuantized-only table and of its scales
                + 2 * 8 + 4 * 4                 # the Reshape's shape (in full), one row of the float table
                + 8)                            # 15 INT4 elements: 8 bytes
    assert front.decode_weight_bytes(path) == expected
    assert front.element_bits(TensorProto.INT4) == 4 and front.element_bits(TensorProto.FLOAT16) == 16
