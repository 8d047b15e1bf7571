"""The fused ONNX graph (exporter/onnx/fused) on tiny random Llama, Mistral (GQA), Qwen2 (biases), Qwen3
(q/k norms) and OPT (learned positions, LayerNorm, ReLU): logits equal PyTorch's over a prefill and decode
steps, dense and compressed; the interface is the plain export's; the ops are ORT's fused ones; the
low-rank pairs are tagged; onnxruntime-genai serves it; fp16; int4/int8 (MatMulNBits) against PyTorch
carrying the same rounded weights; the streaming writer keeps no weight of an earlier layer.

Tolerance: float32 logits within 1e-4 of PyTorch's (measured ≤ 3e-7 on these models) with every top-1
and greedy token equal; float16 within exporter.validate.parity's 5e-2."""
import copy
import tracemalloc

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import random_batches, tiny_config, tiny_model
from onnx_helpers import char_tokenizer

from exporter.config import CompressionConfig, Quantization
from exporter.loop.compress import compress_
from exporter.model.lowrank import LowRankLinear
from exporter.onnx.fused import FusedDecoderWriter, UnsupportedModel, build_onnx
from exporter.onnx.fused.quantize import dequantize, linear_bytes, nbits_bytes, quantize_weight
from exporter.onnx.fused.reference import round_like_export
from exporter.onnx.plain import io_names
from exporter.validate.ort_session import OrtDecoder
from exporter.validate.parity import genai_greedy, logits_parity, parity, torch_greedy
from graph_rewrite.tags import LOWRANK_KEY, MODULE_KEY

FUSED_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "opt"]
TOLERANCE = 1e-4


def ids(batch=2, length=7, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def compressed(model):
    compress_(model, random_batches(), CompressionConfig(method="svd", ratio=0.4, allocation="uniform"),
              progress=False)
    return model


def ops(path) -> list[str]:
    return [node.op_type for node in onnx.load(path, load_external_data=False).graph.node]


def lowrank_modules(model) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


@pytest.mark.parametrize("arch", FUSED_ARCHS)
@pytest.mark.parametrize("variant", ["dense", "compressed"])
def test_fused_graph_equals_pytorch(arch, variant, tmp_path):
    model = tiny_model(arch)
    if variant == "compressed":
        compressed(model)
    path = build_onnx(model, char_tokenizer(), tmp_path)
    result = parity(model, OrtDecoder.load(path), ids(), "float32", steps=4, new_tokens=8)
    assert result["passed"] and result["greedy"]["equal"], result
    assert result["max_abs_diff"] < TOLERANCE and len(result["steps"]) == 5

    graph = onnx.load(path, load_external_data=False).graph
    kinds = ops(path)
    layers = tiny_config(arch).num_hidden_layers
    assert kinds.count("GroupQueryAttention") == layers
    assert kinds.count("RotaryEmbedding") == (0 if arch == "opt" else 2 * layers)
    skip = "SkipLayerNormalization" if arch == "opt" else "SkipSimplifiedLayerNormalization"
    assert kinds.count(skip) == 2 * layers + (0 if arch == "opt" else -1) + 1  # OPT's first one adds positions
    cache_readers = {n.op_type for n in graph.node if any(i.startswith("past_key_values") for i in n.input)}
    assert cache_readers == {"GroupQueryAttention"} and "Softmax" not in kinds  # cache and attention inside GQA
    tags = [{p.key: p.value for p in node.metadata_props} for node in graph.node if node.op_type in ("MatMul", "Gemm")]
    lowrank = lowrank_modules(model)
    paired = [t[LOWRANK_KEY] for t in tags if LOWRANK_KEY in t]
    assert sorted(paired) == sorted(2 * list(lowrank))  # two MatMuls per compressed linear, tagged
    dense = {t[MODULE_KEY] for t in tags if MODULE_KEY in t}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith((".down", ".up"))}
    assert dense == linears  # every other linear (lm_head included) is one tagged MatMul (Gemm when tied)
    tied = model.config.tie_word_embeddings  # OPT: the lm_head reads the embedding table, stored once
    assert kinds.count("Gemm") == int(tied) and len(graph.initializer) == len({t.name for t in graph.initializer})


def test_interface_is_the_plain_exports(tmp_path):
    model = tiny_model("mistral")
    graph = onnx.load(build_onnx(model, char_tokenizer(), tmp_path), load_external_data=False).graph
    inputs, outputs = io_names(2, position_ids=True)
    assert [i.name for i in graph.input] == inputs and [o.name for o in graph.output] == outputs
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.input) + list(graph.output)}
    assert dims["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["present.0.key"] == ["batch_size", 2, "total_sequence_length", 16]
    assert dims["logits"] == ["batch_size", "sequence_length", 128]
    assert {p.name for p in tmp_path.iterdir()} >= {"model.onnx", "model.onnx_data", "config.json",
                                                     "genai_config.json", "tokenizer.json"}


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_genai_serves_the_fused_graph_like_pytorch(arch, tmp_path):
    model = compressed(tiny_model(arch))
    build_onnx(model, char_tokenizer(), tmp_path)
    prompt = ids(1, 6, seed=3)
    served = genai_greedy(tmp_path, prompt, 20)
    assert len(served) == 20 and served == torch_greedy(model, prompt, 20)


@pytest.mark.parametrize("arch", ["qwen2", "opt"])  # OPT: the tied lm_head's Gemm in float16
def test_fp16_fused_graph(arch, tmp_path):
    model = compressed(tiny_model(arch)).half()
    path = build_onnx(model, char_tokenizer(), tmp_path, dtype="float16")
    graph = onnx.load(path, load_external_data=False).graph
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    result = logits_parity(model, OrtDecoder.load(path), ids(), steps=3, dtype="float16")
    assert result["passed"], result


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_quantized_graph_equals_pytorch_with_the_same_rounded_weights(arch, bits, tmp_path):
    """Every matmul (both factors of each pair, dense linears, lm_head) is MatMulNBits; the graph equals a
    PyTorch copy whose weights went through the same quantizer and back."""
    model = compressed(tiny_model(arch))
    q = Quantization(bits=bits, block_size=16, accuracy_level=0)  # float activations: exact to the rounding
    path = build_onnx(model, char_tokenizer(), tmp_path, quantization=q)
    kinds = ops(path)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())  # .down/.up count as theirs
    assert "MatMul" not in kinds and kinds.count("MatMulNBits") == linears
    result = parity(round_like_export(model, q), OrtDecoder.load(path), ids(), "float32", steps=3, new_tokens=8)
    assert result["passed"] and result["max_abs_diff"] < TOLERANCE, result
    float_logits = model(input_ids=ids()).logits.detach()
    assert not torch.allclose(round_like_export(model, q)(input_ids=ids()).logits, float_logits, atol=1e-3)
    default = Quantization(bits=bits, block_size=16)  # accuracy level 4: int8 activations, a looser tolerance
    path = build_onnx(model, char_tokenizer(), tmp_path / "level4", quantization=default)
    result = parity(round_like_export(model, default), OrtDecoder.load(path), ids(), "float32", steps=3,
                    new_tokens=8, int8_activations=True)
    assert result["passed"], result


@pytest.mark.parametrize("tied,embedding_bits,shared", [(True, None, True), (True, 4, False), (False, None, False)])
def test_quantized_embedding_table_equals_pytorch_with_the_same_rounded_table(tied, embedding_bits, shared, tmp_path):
    """The token table as GatherBlockQuantized (at the lm_head's bits by default): tied at the same bits, one
    packed initializer read by it (through a Reshape) and by the lm_head's MatMulNBits; ORT's logits equal
    PyTorch carrying the same rounded table and weights, and onnxruntime-genai serves the graph."""
    from transformers import AutoModelForCausalLM
    config = tiny_config("llama")
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = compressed(AutoModelForCausalLM.from_config(config).eval())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    q = Quantization(bits=4, block_size=16, accuracy_level=0)  # lm_head int8
    path = build_onnx(model, char_tokenizer(), tmp_path, quantization=q, embedding_bits=embedding_bits)
    graph = onnx.load(path, load_external_data=False).graph
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    assert {a.name: a.i for a in gather.attribute}["bits"] == (embedding_bits or q.head_bits)
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.name == "/lm_head/MatMulNBits")
    table = next(n for n in graph.node if n.output[0] == gather.input[0]) if shared else None
    assert (table is not None and table.op_type == "Reshape" and table.input[0] == head.input[1]) == shared
    assert [n.op_type for n in graph.node if "input_ids" in n.input[:2]] == ["GatherBlockQuantized"]
    assert len(graph.initializer) == len({t.name for t in graph.initializer})
    reference = round_like_export(model, q, embedding_bits)
    result = parity(reference, OrtDecoder.load(path), ids(), "float32", steps=3, new_tokens=8)
    assert result["passed"] and result["max_abs_diff"] < TOLERANCE, result
    prompt = ids(1, 6, seed=3)
    assert genai_greedy(tmp_path, prompt, 12) == torch_greedy(reference, prompt, 12)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, True)])
def test_quantized_bytes_and_dequantization_are_the_quantizers(bits, symmetric):
    rng = np.random.default_rng(0)
    q = Quantization(bits=bits, block_size=32, symmetric=symmetric)
    for k, n in ((64, 24), (40, 7), (100, 33)):  # K a multiple of the block, and not
        w = rng.standard_normal((k, n)).astype(np.float32)
        nbits = quantize_weight(w, q, np.float16)
        stored = sum(a.nbytes for a in (nbits.packed, nbits.scales, nbits.zero_points) if a is not None)
        assert stored == nbits_bytes(k, n, q, scale_bytes=2)
        back = dequantize(nbits, q)
        assert back.shape == (k, n) and np.abs(back - w).max() < (0.3 if bits == 4 else 0.02)
    assert linear_bytes(96, 64, 8, q, 4) == nbits_bytes(64, 8, q, 4) + nbits_bytes(8, 96, q, 4)
    assert linear_bytes(96, 64, None, None, 2) == 96 * 64 * 2 and linear_bytes(96, 64, 8, None, 2) == 8 * 160 * 2


def test_streaming_writer_keeps_no_weights_of_earlier_layers(tmp_path):
    """add_layer writes a layer's weights to disk and keeps references: the traced numpy memory does not grow
    with the layers, a layer's modules can be dropped right after its call (here: moved to the meta device),
    and the finished graph still equals PyTorch."""
    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 128, 512, 4
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM
    model = compressed(AutoModelForCausalLM.from_config(config).eval())
    reference = copy.deepcopy(model)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())

    writer = FusedDecoderWriter(config, tmp_path)
    writer.add_outside(model)
    tracemalloc.start()
    try:
        grown, peaks = [], []
        for index, layer in enumerate(model.model.layers):
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            writer.add_layer(index, layer)
            current, peak = tracemalloc.get_traced_memory()
            grown.append(current - before)
            peaks.append(peak - before)
            layer.to("meta")  # the layer is gone: whatever the writer kept of it cannot be read any more
    finally:
        tracemalloc.stop()
    assert max(grown) < 0.1 * layer_bytes, (grown, layer_bytes)  # graph nodes only, no weight copies
    largest = max(p.numel() * p.element_size() for p in reference.model.layers[0].parameters())
    assert max(peaks) < 2 * largest + 0.1 * layer_bytes, (peaks, largest)  # one weight in flight at a time
    weights = [v.const_value for v in writer.b.initializers.values() if v.const_value.nbytes > 1024]
    assert weights and all(isinstance(t, ir.ExternalTensor) for t in weights)
    path = writer.finish(char_tokenizer(), reference.generation_config)
    result = logits_parity(reference, OrtDecoder.load(path), ids(), steps=3)
    assert result["passed"] and result["max_abs_diff"] < TOLERANCE, result


def test_writer_order_and_completeness_are_checked(tmp_path):
    model = tiny_model("llama")
    writer = FusedDecoderWriter(model.config, tmp_path)
    with pytest.raises(ValueError, match="expected layer 0, got 1"):
        writer.add_layer(1, model.model.layers[1])
    writer.add_layer(0, model.model.layers[0])
    with pytest.raises(RuntimeError, match=r"embeddings, final norm and lm_head, layers 1\.\.1 not added"):
        writer.finish()
    writer.add_layer(1, model.model.layers[1])
    writer.add_outside(model)  # after the layers: the order of the outside parts is free
    with pytest.raises(RuntimeError, match="already added"):
        writer.add_outside(model)
    assert logits_parity(model, OrtDecoder.load(writer.finish(char_tokenizer())), ids(), steps=2)["passed"]


def test_unsupported_models_are_refused_with_one_line(tmp_path):
    from transformers import GPT2Config, OPTConfig
    with pytest.raises(UnsupportedModel, match="does not handle architecture 'gpt2'.*--onnx-graph plain"):
        FusedDecoderWriter(GPT2Config(n_layer=1, n_embd=32, n_head=2), tmp_path)
    opt350 = OPTConfig(hidden_size=64, word_embed_proj_dim=32, do_layer_norm_before=False, num_attention_heads=4,
                       ffn_dim=128, num_hidden_layers=1, vocab_size=128)
    with pytest.raises(UnsupportedModel, match="post-layer-norm OPT.*word_embed_proj_dim"):
        FusedDecoderWriter(opt350, tmp_path)
    llama = tiny_config("llama")
    llama.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(UnsupportedModel, match="dynamic rope scaling"):
        FusedDecoderWriter(llama, tmp_path)
    with pytest.raises(ValueError, match="float32 or float16"):
        FusedDecoderWriter(tiny_config("llama"), tmp_path, dtype="bfloat16")


def test_graph_weight_bytes_are_the_models_plus_row_lookups(tmp_path):
    """bound.graph_decode_weight_bytes on the fused graph: the PyTorch count, plus the row each lookup
    table is read by (embedding, cos, sin) and the three int64 mask constants; quantized, each linear
    costs what exporter.config says."""
    from exporter.validate.bound import decode_weight_bytes, graph_decode_weight_bytes
    model = compressed(tiny_model("llama"))
    config = model.config
    float_bytes = graph_decode_weight_bytes(build_onnx(model, char_tokenizer(), tmp_path / "f32"))
    rows = config.hidden_size * 4 + 2 * (config.hidden_size // config.num_attention_heads // 2) * 4
    assert float_bytes == decode_weight_bytes(model) + rows + 3 * 8
    q = Quantization(bits=4, block_size=16)
    int4_bytes = graph_decode_weight_bytes(build_onnx(model, char_tokenizer(), tmp_path / "int4", quantization=q))
    saved = config.hidden_size * 4 - nbits_bytes(config.hidden_size, 1, q.head(), 4)  # a row of the int8 table
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):  # lm_head at q.head(): int8
            setting = q.head() if name == "lm_head" else q
            saved += m.weight.numel() * 4 - linear_bytes(m.out_features, m.in_features, None, setting, 4)
    assert int4_bytes == float_bytes - saved
