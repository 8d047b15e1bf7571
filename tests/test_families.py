"""Every family in tests/families.py, end to end on a tiny random-weight model: compress (every linear but
routers), reload from safetensors with identical logits, ONNX export with the KV cache and the low-rank
pairs in parity with PyTorch, and onnxruntime-genai generating what PyTorch generates.

benchmarks/quality/families.py runs this file and turns its outcomes into the README's family table.
"""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import random_batches
from families import FAMILIES, UNNAMED, family_model
from onnx_helpers import char_tokenizer

from exporter import CompressionConfig, compress_, load_compressed
from exporter.cli import main
from exporter.model.lowrank import LowRankLinear
from exporter.onnx.plain import GENAI_GENERIC, GENAI_TYPES, export_compressed, export_onnx
from exporter.output.artifact import save_compressed
from exporter.validate.ort_session import OrtDecoder
from exporter.validate.parity import genai_greedy, parity, torch_greedy

CONFIG = CompressionConfig(method="svd-llm-v2", ratio=0.4, allocation="uniform")


def calibration():
    return random_batches(n=4, seqlen=16)


def prompt(length=7, seed=1):
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def compressed(family, tmp_path_factory):
    model = family_model(family)
    result = compress_(model, calibration(), CONFIG, progress=False)
    folder = tmp_path_factory.mktemp(f"{family}-safetensors")
    save_compressed(model, char_tokenizer(), folder, {"method": CONFIG.method, "ranks": result.plan})
    return model, result, folder


@pytest.fixture(scope="module")
def exported(family, tmp_path_factory):
    """The pipeline's order: the dense model is exported, then compressed, then its graph rewritten."""
    model = family_model(family)
    folder = tmp_path_factory.mktemp(f"{family}-onnx")
    dense = export_onnx(model, char_tokenizer(), folder / "dense")
    compress_(model, calibration(), CONFIG, progress=False)
    path, count = export_compressed(dense, model, folder / "compressed")
    return model, path, count


def test_compress(family, compressed):
    model, result, _ = compressed
    assert len(result.plan) == FAMILIES[family].linears
    for name, rank in result.plan.items():
        module = model.get_submodule(name)
        assert isinstance(module, LowRankLinear) and module.rank == rank
    for record in result.records.values():  # V2 reaches the optimum on every matrix, experts included
        # abs: an expert given fewer tokens than its rank has optimum 0; its float32-stored factors leave ~1e-7
        assert record.loss == pytest.approx(record.loss_min, rel=1e-6, abs=1e-6)
    dense, after = result.linear_params()
    assert after <= 0.6 * dense


def test_reload(family, compressed):
    model, _, folder = compressed
    batch = calibration()[0]
    reloaded = load_compressed(folder)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=batch).logits, model(input_ids=batch).logits)


def test_onnx(family, exported):
    model, path, count = exported
    assert count == FAMILIES[family].linears
    result = parity(model, OrtDecoder.load(path), prompt(), "float32", steps=3, new_tokens=8)
    assert result["passed"], result


def test_genai(family, exported):
    model, path, _ = exported
    genai = json.loads((path.parent / "genai_config.json").read_text())["model"]
    assert genai["type"] == GENAI_TYPES.get(model.config.model_type, GENAI_GENERIC)
    ids = prompt(6, seed=3)
    served = genai_greedy(path.parent, ids, 12)
    reference = torch_greedy(model, ids, 12)
    assert served and served == reference[:len(served)]
    assert len(served) == 12 or served[-1] == genai["eos_token_id"]  # genai stops only at end of sequence


def test_the_unnamed_families_are_named_nowhere_in_the_exporter():
    """What makes them the proof of discovery: no line of exporter/ or graph_rewrite/ knows them."""
    root = Path(__file__).resolve().parents[1]
    spellings = {"gpt_neox": ("neox",), "starcoder2": ("starcoder",)}
    sources = [p for folder in ("exporter", "graph_rewrite") for p in (root / folder).rglob("*.py")]
    for family in UNNAMED:
        for spelling in spellings[family]:
            named = [p.name for p in sources if spelling in p.read_text().lower()]
            assert not named, f"{family} is named in {named}"


def test_cli_compresses_and_exports_an_moe_checkpoint(tmp_path, texts):
    """The whole run from a saved Mixtral checkpoint (fused experts, hub key names): experts unfused before
    any work, every expert compressed, ONNX validated, genai's generic type reported, reload exact."""
    model_dir, out, text = tmp_path / "model", tmp_path / "out", tmp_path / "text.txt"
    family_model("mixtral").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    text.write_text((texts / "evaluation.txt").read_text()[:20000])
    result = CliRunner().invoke(main, [
        "--model", str(model_dir), "--ratio", "0.4", "--method", "svd-llm-v2", "--allocation", "uniform",
        "--format", "onnx", "--format", "safetensors", "--out", str(out), "--calib-data", str(text),
        "--calib-samples", "4", "--calib-seqlen", "64", "--eval-data", str(text), "--eval-tokens", "256",
        "--eval-seqlen", "128", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["rewritten_linears"] == len(report["layers"]) == FAMILIES["mixtral"].linears
    assert all(p["passed"] for p in report["onnx"]["parity"].values())
    genai = report["onnx"]["genai"]
    assert genai["type"] == GENAI_GENERIC and not genai["model_type_known"] and "'mixtral'" in genai["note"]
    ids = calibration()[0]
    with torch.no_grad():
        assert torch.isfinite(load_compressed(out)(input_ids=ids).logits).all()
