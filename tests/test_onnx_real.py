"""The real model through ONNX: SmolLM2-135M compressed at 0.4, exported, validated by the pipeline,
and served by onnxruntime-genai. One CLI run (8 calibration samples × 256 tokens, 4 evaluation windows
of 512) feeds every test; the dense folder is exported once more for the genai test. The method is plain
SVD: what is checked here is the export, and SVD needs no whitening pass (minutes on a shared CPU)."""
import json

import pytest
from click.testing import CliRunner

from exporter.cli import main
from exporter.output.artifact import load_compressed
from exporter.validate.parity import genai_greedy, prompt_ids, torch_greedy

pytestmark = pytest.mark.slow
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory, texts):
    out = tmp_path_factory.mktemp("smollm2") / "out"
    result = CliRunner().invoke(main, [
        "--model", "smollm2-135m", "--ratio", "0.4", "--method", "svd", "--allocation", "uniform", "--format", "onnx", "--format", "safetensors",
        "--out", str(out), "--calib-data", str(texts / "calibration.txt"), "--calib-samples", "8",
        "--calib-seqlen", "256", "--eval-data", str(texts / "evaluation.txt"), "--eval-tokens", "2048",
        "--eval-seqlen", "512", "-q"])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "report.json").read_text())


def test_onnx_perplexity_and_parity_match_pytorch(run):
    _, report = run
    ppl = report["perplexity"]
    assert ppl["window"] == 512 and ppl["tokens"] == 2048
    for kind in ("dense", "compressed"):
        assert ppl[f"onnx_{kind}"] == pytest.approx(ppl[kind], rel=5e-3)
        parity = report["onnx"]["parity"][kind]
        assert parity["passed"] and parity["greedy"]["equal"], parity
    assert ppl["compressed"] > ppl["dense"]  # compression at 0.4 costs something: the two graphs differ
    assert report["onnx"]["rewritten_linears"] == len(report["layers"]) == 30 * 7


def greedy_check(folder, model, tokenizer):
    ids = prompt_ids(tokenizer)
    served = genai_greedy(folder, ids, NEW_TOKENS)
    reference = torch_greedy(model, ids, NEW_TOKENS)
    eos = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    assert served and served == reference[:len(served)]
    assert len(served) == NEW_TOKENS or served[-1] in (eos if isinstance(eos, list) else [eos])


def test_genai_serves_the_compressed_folder_like_pytorch(run, smollm2):
    out, _ = run
    _, tokenizer = smollm2
    greedy_check(out, load_compressed(out), tokenizer)


def test_genai_serves_the_dense_export_like_pytorch(smollm2, tmp_path):
    """The default (fused) graph of the dense model; the plain dynamo graph is served in tests/test_families.py."""
    from exporter.onnx.fused import build_onnx
    model, tokenizer = smollm2
    build_onnx(model, tokenizer, tmp_path)
    greedy_check(tmp_path, model, tokenizer)


# The stated bounds on what round-to-nearest quantization (block 32, an 8-bit lm_head: the settings
# docs/results/throughput-cpu.md measures) may cost SmolLM2-135M's ORT perplexity, relative to the float export.
INT4_PPL_BOUND, INT8_PPL_BOUND = 1.35, 1.02


def test_int4_and_int8_exports_perplexity_and_size(smollm2, texts, tmp_path):
    """The fused float, int8 and int4 exports of SmolLM2 under ONNX Runtime: float equals PyTorch, int4 and int8
    perplexities within the stated bounds of the float export's, and int4 under 45% of the float size on disk."""
    from exporter.config import Quantization
    from exporter.data.windows import evaluation_tokens
    from exporter.onnx.fused import build_onnx
    from exporter.validate.ort_session import OrtDecoder
    from exporter.validate.perplexity import perplexity, torch_logits
    model, tokenizer = smollm2
    ids = evaluation_tokens(model, tokenizer, str(texts / "evaluation.txt"), 2048, 512)
    ppl, size = {}, {}
    for name, q in (("float", None), ("int8", Quantization(bits=8, block_size=32)),
                    ("int4", Quantization(bits=4, block_size=32, head_bits=8))):
        path = build_onnx(model, tokenizer, tmp_path / name, quantization=q)
        ppl[name] = perplexity(OrtDecoder.load(path).logits_fn(), ids, 512, progress=False)
        size[name] = sum(p.stat().st_size for p in (tmp_path / name).glob("model.onnx*"))
    assert ppl["float"] == pytest.approx(perplexity(torch_logits(model), ids, 512, progress=False), rel=1e-3)
    assert ppl["float"] < ppl["int8"] <= INT8_PPL_BOUND * ppl["float"], ppl
    assert ppl["int8"] < ppl["int4"] <= INT4_PPL_BOUND * ppl["float"], ppl
    assert size["int4"] < 0.45 * size["float"] and size["int8"] < 0.55 * size["float"], size


def test_the_default_recipe_with_int4_passes_its_own_checks(texts, tmp_path):
    """The default recipe at 0.4 with --quantize int4 (GPTQ in the layer loop at block 64, the tied table packed
    once at the head's 4 bits): no --skip-parity, and the run succeeds. Its graph holds the loop's grid (a
    GatherBlockQuantized table, every decoder matmul MatMulNBits), and ORT's perplexity is the PyTorch
    model's with the same weights, up to the int8 activations of accuracy level 4."""
    import onnx
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "--model", "smollm2-135m", "--ratio", "0.4", "--format", "onnx", "--quantize", "int4", "--out", str(out),
        "--calib-data", str(texts / "calibration.txt"), "--calib-samples", "8", "--calib-seqlen", "256",
        "--eval-data", str(texts / "evaluation.txt"), "--eval-tokens", "1024", "--eval-seqlen", "512", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"].startswith("default") and report["onnx"]["parity"]["compressed"]["passed"]
    assert len(report["method_details"]["quantize"]) == 30 * 7 and report["method_details"]["quantize_head"]["tied"]
    kinds = [n.op_type for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node]
    assert "GatherBlockQuantized" in kinds and "MatMul" not in kinds
    ppl = report["perplexity"]
    assert ppl["onnx_compressed"] == pytest.approx(ppl["compressed"], rel=0.03), ppl
