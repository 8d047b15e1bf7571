"""ONNX export on tiny random Llama, Mistral (GQA), Qwen2 (biases) and OPT: names and dynamic axes,
dense and compressed parity with PyTorch over a prefill and decode steps, the rewrite against a direct
export of the swapped model, fp16, onnxruntime-genai, and the CLI's errors."""
import copy
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import random_batches, tiny_model
from onnx import numpy_helper
from onnx_helpers import char_tokenizer, tiny_model_dir

from exporter.cli import main
from exporter.config import CompressionConfig
from exporter.loop.compress import compress_
from exporter.model.lowrank import LowRankLinear
from exporter.onnx.plain import export_compressed, export_onnx
from exporter.validate.ort_session import OrtDecoder
from exporter.validate.parity import genai_greedy, logits_parity, parity, torch_greedy
from graph_rewrite.passes import RewriteError


def ids(batch=2, length=7, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def compressed_copy_of(model):
    compress_(model, random_batches(), CompressionConfig(method="svd", ratio=0.4), progress=False)
    return model


def test_dense_export_names_axes_and_parity(arch, tmp_path):
    model = tiny_model(arch)
    path = export_onnx(model, char_tokenizer(), tmp_path)
    graph = onnx.load(path, load_external_data=False)
    names_in = [i.name for i in graph.graph.input]
    names_out = [o.name for o in graph.graph.output]
    assert names_in[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names_in[3:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert names_out == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert isinstance(dims["input_ids"][0], str) and isinstance(dims["input_ids"][1], str)
    assert isinstance(dims["past_key_values.0.key"][2], str)
    assert graph.opset_import[0].version >= 18
    assert {p.name for p in tmp_path.iterdir()} >= {"model.onnx", "model.onnx_data", "config.json",
                                                     "genai_config.json", "tokenizer.json"}
    result = logits_parity(model, OrtDecoder.load(path), ids(), steps=4)
    assert result["passed"], result
    assert len(result["steps"]) == 5 and result["max_abs_diff"] < 1e-4


def test_compressed_export_rewrites_every_module_and_matches(arch, tmp_path):
    model = tiny_model(arch)
    dense_path = export_onnx(model, char_tokenizer(), tmp_path / "dense")
    dense_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    compressed_copy_of(model)
    compressed = {n for n, m in model.named_modules() if type(m).__name__ == "LowRankLinear"}
    path, count = export_compressed(dense_path, model, tmp_path / "compressed")
    assert count == len(compressed) == (12 if arch == "opt" else 14)

    graph = onnx.load(path)
    onnx.checker.check_model(graph)
    initializers = [numpy_helper.to_array(t) for t in graph.graph.initializer]
    for name in compressed:  # the dense weight is gone, in either orientation
        w = dense_weights[name].numpy()
        assert not any(a.shape in (w.shape, w.T.shape) and (np.array_equal(a, w) or np.array_equal(a, w.T))
                       for a in initializers), name
    decoder = OrtDecoder.load(path)
    result = parity(model, decoder, ids(), "float32", steps=4, new_tokens=8)
    assert result["passed"], result

    # Exporting the swapped PyTorch model directly gives the same numbers as the rewritten dense graph.
    direct = OrtDecoder.load(export_onnx(model, char_tokenizer(), tmp_path / "direct"))
    prompt = ids(1, 9, seed=5).numpy()
    a, past_a = decoder.prefill(prompt)
    b, past_b = direct.prefill(prompt)
    np.testing.assert_allclose(a, b, atol=1e-5)
    for x, y in zip(past_a, past_b):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_fp16_export_is_an_fp16_graph(tmp_path):
    model = tiny_model("llama")
    before = model.state_dict()["model.layers.0.mlp.up_proj.weight"].clone()
    path = export_onnx(model, char_tokenizer(), tmp_path, dtype="float16")
    assert torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"], before)  # exported from a copy
    graph = onnx.load(path, load_external_data=False)
    types = {i.name: i.type.tensor_type.elem_type for i in graph.graph.input}
    assert types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    result = logits_parity(model.half(), OrtDecoder.load(path), ids(), steps=3, dtype="float16")
    assert result["passed"], result


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_genai_greedy_equals_pytorch(arch, tmp_path):
    model = compressed_copy_of(tiny_model(arch))
    dense = export_onnx(tiny_model(arch), char_tokenizer(), tmp_path / "dense")
    export_compressed(dense, model, tmp_path / "compressed")
    prompt = ids(1, 6, seed=3)
    served = genai_greedy(tmp_path / "compressed", prompt, 20)
    reference = torch_greedy(model, prompt, 20)
    eos = json.loads((tmp_path / "compressed" / "genai_config.json").read_text())["model"]["eos_token_id"]
    assert served == reference[:len(served)]
    assert len(served) == 20 or served[-1] in np.atleast_1d(eos)  # genai stops only at end of sequence


def test_unsupported_architecture_dtype_and_opset_are_refused(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_ff=64, num_layers=1, num_heads=2)).eval()
    with pytest.raises(ValueError, match="'t5' is an encoder-decoder"):
        export_onnx(t5, char_tokenizer(), tmp_path)
    assert not any(tmp_path.iterdir())  # refused before any work
    with pytest.raises(ValueError, match="opset >= 18"):
        export_onnx(tiny_model("llama"), char_tokenizer(), tmp_path, opset=17)
    with pytest.raises(ValueError, match="float32 or float16"):
        export_onnx(tiny_model("llama"), char_tokenizer(), tmp_path, dtype="bfloat16")


def test_a_compressed_module_missing_from_the_graph_is_an_error(tmp_path):
    dense_path = export_onnx(tiny_model("llama"), char_tokenizer(), tmp_path / "dense")
    other = compressed_copy_of(tiny_model("llama"))
    other.model.layers[0].mlp.register_module("extra", LowRankLinear(64, 128, 4, bias=False))  # not in the graph
    with pytest.raises(RewriteError, match="no dense weight in the ONNX graph, e.g. model.layers.0.mlp.extra"):
        export_compressed(dense_path, other, tmp_path / "compressed")


def cli(model_dir, text, out, *extra):
    return CliRunner().invoke(main, [
        "--model", str(model_dir), "--ratio", "0.4", "--method", "svd", "--format", "onnx", "--out", str(out),
        "--calib-data", str(text), "--calib-samples", "4", "--calib-seqlen", "64", "--eval-data", str(text),
        "--eval-tokens", "512", "--eval-seqlen", "128", "-q", *extra])


@pytest.fixture
def tiny_run(tmp_path, texts):
    model_dir = tiny_model_dir("llama", tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text((texts / "evaluation.txt").read_text()[:20000])
    return model_dir, text


@pytest.mark.parametrize("graph", ["fused", "plain"])
def test_cli_writes_a_validated_onnx_folder(tiny_run, tmp_path, graph):
    out = tmp_path / "out"
    result = cli(*tiny_run, out, "--format", "safetensors", "--onnx-graph", graph)
    assert result.exit_code == 0, result.output
    kinds = [node.op_type for node in onnx.load(out / "model.onnx", load_external_data=False).graph.node]
    assert ("GroupQueryAttention" in kinds) == (graph == "fused")
    assert {"model.onnx", "model.onnx_data", "genai_config.json", "model.safetensors", "report.json"} \
        <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["rewritten_linears"] == len(report["layers"]) == 14
    for kind in ("dense", "compressed"):
        p = report["onnx"]["parity"][kind]
        assert p["passed"] and p["greedy"]["equal"] and p["greedy"]["new_tokens"] == 32
        ppl = report["perplexity"]
        assert ppl[f"onnx_{kind}"] == pytest.approx(ppl[kind], rel=5e-3)
    # config.json is the safetensors one, with the rank plan, not the ONNX export's copy
    assert "svd_export" in json.loads((out / "config.json").read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no work folder left behind


def test_a_bfloat16_model_gets_a_float16_graph(tiny_run, tmp_path):
    out = tmp_path / "out"
    result = cli(*tiny_run, out, "--dtype", "bfloat16", "--skip-parity")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["dtype"]["export"] == "bfloat16" and report["onnx"]["dtype"] == "float16"


def test_cli_errors_leave_nothing(tiny_run, tmp_path):
    out = tmp_path / "out"
    result = cli(*tiny_run, out, "--opset", "17")
    assert result.exit_code == 1 and "opset >= 18" in result.output
    result = cli(*tiny_run, out, "--method", "nonsense")
    assert result.exit_code == 2 and "nonsense" in result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_fp16_rewrite_with_small_external_norm_weights(tmp_path):
    """Issue 13 item 5: an fp16 OPT whose norm weights (hidden 256 → 512 bytes) are saved as external data
    but are small enough that the checker is handed them inline; the checker then looked for
    model.onnx_data in the working directory and failed at step 0. The rewrite now succeeds and matches."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM
    config = tiny_config("opt")
    config.hidden_size = config.word_embed_proj_dim = 256
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    dense = copy.deepcopy(model).half()
    dense_path = export_onnx(dense, char_tokenizer(), tmp_path / "dense", dtype="float16")
    graph = onnx.load(dense_path)  # every initializer external, the small ones included: the layout that failed
    (tmp_path / "dense" / "model.onnx_data").unlink(missing_ok=True)
    onnx.save_model(graph, dense_path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=0)
    external = [t.name for t in onnx.load(dense_path, load_external_data=False).graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL and 256 <= 2 * np.prod(t.dims) <= 1000]
    assert "model.model.decoder.final_layer_norm.weight" in external  # the case that failed
    model = compressed_copy_of(model).half()
    path, count = export_compressed(dense_path, model, tmp_path / "compressed")
    assert count == 12
    result = logits_parity(model, OrtDecoder.load(path), ids(), steps=2, dtype="float16")
    assert result["passed"], result


def test_cli_int4_export_with_rank_multiple(tiny_run, tmp_path):
    """--quantize int4 --rank-multiple 16: every matmul is MatMulNBits, every rank a multiple of 16, the
    graph passes parity against PyTorch carrying the same rounded weights, and its ORT perplexity is
    reported beside PyTorch's float one."""
    out = tmp_path / "out"
    result = cli(*tiny_run, out, "--quantize", "int4", "--block-size", "16", "--rank-multiple", "16")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["quantize"] == {"bits": 4, "block_size": 16, "symmetric": True, "accuracy_level": 4,
                                          "lm_head_bits": 4}  # the head at --quantize's bits by default
    assert report["layers"] and all(layer["rank"] % 16 == 0 for layer in report["layers"].values())
    parity_check = report["onnx"]["parity"]["compressed"]  # int8 activations: INT8_ACTIVATIONS' tolerance
    assert parity_check["passed"] and parity_check["tolerance"] == 2.0 and parity_check["top1_agreement"] >= 0.95
    kinds = [node.op_type for node in onnx.load(out / "model.onnx", load_external_data=False).graph.node]
    assert "MatMul" not in kinds and kinds.count("MatMulNBits") == 2 * len(report["layers"]) + 1  # + lm_head
    ppl = report["perplexity"]
    assert ppl["onnx_compressed"] != ppl["compressed"] and ppl["onnx_dense"] == pytest.approx(ppl["dense"], rel=5e-3)


def test_cli_quantize_needs_the_fused_graph(tiny_run, tmp_path):
    result = cli(*tiny_run, tmp_path / "out", "--quantize", "int4", "--onnx-graph", "plain")
    assert result.exit_code == 1 and "--quantize" in result.output and "--onnx-graph fused" in result.output
    assert not (tmp_path / "out").exists()


def test_parity_tolerance_grows_with_the_logits_but_not_below_their_measured_size():
    from exporter.validate.parity import LOGIT_SIZE, scaled_tolerance
    assert scaled_tolerance(0.05, 3.0) == 0.05 and scaled_tolerance(0.05, LOGIT_SIZE) == 0.05
    assert scaled_tolerance(0.05, 10 * LOGIT_SIZE) == pytest.approx(0.5)
    assert scaled_tolerance(0.05, 10 * LOGIT_SIZE) < 0.1 * 10 * LOGIT_SIZE  # a wiring error (logit-sized) still fails


def test_a_near_tie_broken_by_int8_activations_agrees_but_a_wrong_top1_does_not():
    from exporter.validate.parity import _compare
    reference = torch.tensor([[[10.0, 9.5, 0.0], [10.0, 2.0, 0.0]]])
    flipped_tie = np.array([[[9.4, 9.6, 0.0], [10.0, 2.0, 0.0]]], np.float32)  # 10 vs 9.5: within 2.0
    flipped_far = np.array([[[10.0, 9.5, 0.0], [9.0, 11.0, 0.0]]], np.float32)  # 10 vs 2: a different answer
    assert _compare(flipped_tie, reference)[1:] == (1, 2) and _compare(flipped_tie, reference, True)[1:] == (2, 2)
    assert _compare(flipped_far, reference, True)[1:] == (1, 2)


def test_an_onnx_only_folder_says_it_has_no_safetensors(tiny_run, tmp_path):
    """--format onnx alone: the safetensors the export read back are gone and config.json no longer records
    them, so load_compressed says the folder has none (not that a recorded file went missing)."""
    from exporter.output.artifact import load_compressed
    out = tmp_path / "out"
    assert cli(*tiny_run, out).exit_code == 0
    assert not list(out.glob("*.safetensors*"))
    assert json.loads((out / "config.json").read_text())["svd_export"]["checksums"] == {}
    with pytest.raises(ValueError, match="no safetensors weights.*--format onnx alone"):
        load_compressed(out)
