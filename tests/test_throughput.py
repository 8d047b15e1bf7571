"""Throughput validation: the weight-bytes bound (exact arithmetic), the provider check (CUDA asked on a
CPU-only ONNX Runtime fails loudly), the IO-bound decode loop (its logits equal PyTorch's), and a tiny CPU
run of the whole measurement producing report.json's keys. No timing is asserted."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import random_batches, tiny_config, tiny_model
from onnx_helpers import char_tokenizer, tiny_model_dir

from exporter import CompressionConfig, compress_
from exporter.bench import main as bench_main
from exporter.bench import measure_folder
from exporter.config import CalibrationConfig, RunConfig
from exporter.onnx.plain import export_compressed, export_onnx
from exporter.output.artifact import save_compressed
from exporter.run import run
from exporter.validate.bound import bound_decode_speedup, compressed_weight_bytes, decode_weight_bytes
from exporter.validate.providers import CPU, CUDA, check_provider, open_session, resolve_provider
from exporter.validate.throughput import (
    OrtDecodeLoop,
    ThroughputSettings,
    Timing,
    folder_config,
    ort_throughput,
    rates,
    read_signature,
    shares_kv_buffer,
)

ort = pytest.importorskip("onnxruntime")
ROOT = Path(__file__).resolve().parents[1]
TINY = ThroughputSettings(batch=2, prefill=8, decode=4, warmup=1, repeats=2)


class NoTokenizer:
    def save_pretrained(self, folder):
        pass


def layers_of(result) -> dict:
    return {name: {"rank": rec.rank, "shape": list(rec.shape)} for name, rec in result.records.items()}


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_decode_weight_bytes_by_hand(arch):
    cfg = tiny_config(arch)
    model = tiny_model(arch)
    h, f, v, n = cfg.hidden_size, getattr(cfg, "intermediate_size", None) or cfg.ffn_dim, cfg.vocab_size, 2
    if arch == "llama":  # untied: lm_head read in full, embed_tokens one row; q,k,v,o + gate,up,down + 2 norms
        expected = n * (4 * h * h + 3 * h * f + 2 * h) + h + v * h
    else:  # tied: the embedding *is* the output projection; positions table one row; biases and layer norms
        expected = n * (4 * (h * h + h) + (h * f + f) + (f * h + h) + 4 * h) + 2 * h + v * h
    assert decode_weight_bytes(model) == expected * 4


def test_compressed_bytes_match_the_compressed_model():
    model = tiny_model("mistral")
    dense = decode_weight_bytes(model)
    result = compress_(model, random_batches(), CompressionConfig(method="svd", ratio=0.4, allocation="uniform"),
                       progress=False)
    compressed = compressed_weight_bytes(dense, layers_of(result), element_size=4)
    assert compressed == decode_weight_bytes(model)  # the arithmetic equals the bytes of the real modules
    assert bound_decode_speedup(dense, compressed) == dense / compressed > 1.0


def test_bound_guards():
    with pytest.raises(ValueError, match="must be positive"):
        bound_decode_speedup(100, 0)
    with pytest.raises(ValueError, match="does not save parameters"):
        compressed_weight_bytes(1000, {"model.layers.0.x": {"rank": 8, "shape": [8, 8]}}, 4)


def test_rates_are_medians_turned_into_tokens_per_second():
    settings = ThroughputSettings(batch=2, prefill=10, decode=5)
    r = rates([Timing(2.0, 4.0), Timing(1.0, 2.0), Timing(3.0, 8.0)], settings, None)
    assert (r["prefill_s"], r["decode_s"]) == (2.0, 4.0)
    assert r["prefill_tokens_s"] == 2 * 10 / 2.0 and r["decode_tokens_s"] == 2 * 5 / 4.0
    assert r["end_to_end_tokens_s"] == 2 * 5 / (2.0 + 4.0)
    with pytest.raises(RuntimeError, match="non-positive"):
        rates([Timing(0.0, 1.0)], settings, None)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="batch must be >= 1"):
        ThroughputSettings(batch=0)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """A tiny GQA decoder (Mistral: 4 heads, 2 KV heads) and its ONNX export."""
    model = tiny_model("mistral")
    return model, export_onnx(model, char_tokenizer(), tmp_path_factory.mktemp("dense"))


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this ONNX Runtime has CUDA")
def test_cuda_requested_on_a_cpu_only_onnxruntime_fails_loudly(decoder):
    with pytest.raises(RuntimeError, match="CUDA was requested"):
        resolve_provider("cuda")
    session = open_session(decoder[1], CPU)
    with pytest.raises(RuntimeError, match="runs this session on CPUExecutionProvider, not the requested CUDA"):
        check_provider(session, CUDA)  # what a silent fallback looks like: caught
    assert resolve_provider("auto") == CPU


def test_decode_loop_logits_equal_pytorch(decoder):
    """The IO-bound loop with alternating preallocated KV buffers computes the model: after prefill and
    decode steps, its last logits equal a full PyTorch forward over the same ids."""
    model, path = decoder
    session = open_session(path, CPU)
    signature = read_signature(session, folder_config(path.parent))
    assert (signature.kv_heads, signature.head_dim) == (2, 16) and len(signature.past) == 4
    loop = OrtDecodeLoop(session, signature, CPU, TINY, seed=3)
    loop.run_once()
    total = TINY.prefill + TINY.decode
    ids = np.random.default_rng(3).integers(0, signature.vocab, size=(TINY.batch, total), dtype=np.int64)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).logits[:, -1].numpy()
    np.testing.assert_allclose(loop.last_logits(), expected, atol=1e-4, rtol=1e-4)


def test_shared_kv_buffer_decode_equals_pytorch_on_the_fused_graph(tmp_path):
    """The fused graph declares a shared KV buffer: the loop then binds one buffer of the final length as
    past and present and every decode step with the same shapes (the static mask; what CUDA graphs need).
    After the prefill and each protocol's decode steps, the last logits equal PyTorch's; the plain graph
    does not declare the buffer and keeps the alternating protocol."""
    from exporter.onnx.fused import build_onnx
    model = tiny_model("mistral")
    path = build_onnx(model, char_tokenizer(), tmp_path / "fused")
    assert shares_kv_buffer(path.parent)
    session = open_session(path, CPU)
    signature = read_signature(session, folder_config(path.parent))
    total = TINY.prefill + TINY.decode
    ids = np.random.default_rng(3).integers(0, signature.vocab, size=(TINY.batch, total), dtype=np.int64)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).logits[:, -1].numpy()
    for shared in (True, False):
        loop = OrtDecodeLoop(session, signature, CPU, TINY, seed=3, shared_kv=shared)
        loop.run_once()
        loop.run_once()  # the buffers are reused: a second run starts over from the prompt
        np.testing.assert_allclose(loop.last_logits(), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="shared KV buffer"):
        OrtDecodeLoop(session, signature, CPU, TINY, cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA graphs need"):
        ort_throughput(path, CPU, TINY, cuda_graph=True)


def test_the_plain_graph_keeps_alternating_kv_buffers(decoder):
    assert not shares_kv_buffer(decoder[1].parent)


def test_tiny_cpu_run_produces_the_report_keys(decoder, tmp_path):
    dense_model, dense_onnx = decoder
    model = copy.deepcopy(dense_model)
    result = compress_(model, random_batches(), CompressionConfig(method="svd", ratio=0.4, allocation="uniform"),
                       progress=False)
    save_compressed(model, NoTokenizer(), tmp_path, {"method": "svd", "ratio": 0.4, "ranks": dict(result.plan)})
    export_compressed(dense_onnx, model, tmp_path)  # the pipeline's path: a rewrite of the dense graph
    report = {"model": "tiny", "config": {"dtype": "float32"}, "layers": layers_of(result)}
    t = measure_folder(tmp_path, report, provider="cpu", settings=TINY, dense_model=dense_model,
                       tokenizer=char_tokenizer(), echo=lambda *_: None)  # exports the dense graph itself
    assert t["provider"] == CPU and t["settings"]["batch"] == 2
    for variant in (t["dense"], t["compressed"], t["eager"]["dense"], t["eager"]["compressed"]):
        assert_rates_follow_the_protocol(variant, TINY)  # the eager compressed row: reloaded from the safetensors
        assert variant["peak_gpu_mb"] is None  # CPU: no GPU number is invented
    assert t["speedup_decode"] == pytest.approx(t["compressed"]["decode_tokens_s"] / t["dense"]["decode_tokens_s"])
    # the bound: dense weight bytes over compressed ones, the latter counted here from the plan itself
    saved = sum(m.dense_params - result.plan[m.name] * m.params_per_rank for m in result.matrices if m.name in result.plan)
    weights = t["weight_bytes_per_token"]
    assert weights["compressed"] == weights["dense"] - weights["element_size"] * saved
    assert t["bound_decode_speedup"] == pytest.approx(weights["dense"] / weights["compressed"])
    json.dumps(t)  # report.json must be able to hold it


def assert_rates_follow_the_protocol(row: dict, settings) -> None:
    """Tokens/s are the protocol's token counts over the measured median times, not any positive number."""
    assert row["prefill_s"] > 0 and row["decode_s"] > 0
    assert row["prefill_tokens_s"] == pytest.approx(settings.batch * settings.prefill / row["prefill_s"])
    assert row["decode_tokens_s"] == pytest.approx(settings.batch * settings.decode / row["decode_s"])
    assert row["end_to_end_tokens_s"] == pytest.approx(settings.batch * settings.decode
                                                       / (row["prefill_s"] + row["decode_s"]))


def test_ort_throughput_refuses_a_graph_without_kv_cache(tmp_path):
    from onnx import TensorProto, helper, save
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)], "no_cache",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="no past_key_values"):
        ort_throughput(tmp_path / "model.onnx", CPU, TINY)


def test_pipeline_validate_throughput_end_to_end(tmp_path):
    """svd-export --format onnx --format safetensors --validate throughput on a tiny model folder:
    report.json holds the throughput keys, report.md shows them (CPU settings, this ORT has no CUDA)."""
    folder = tiny_model_dir("llama", tmp_path / "model")
    config = RunConfig(model=str(folder), out=str(tmp_path / "out"), formats=("safetensors", "onnx"), device="cpu",
                       validations=("throughput",), evaluation=None, parity=False,
                       compression=CompressionConfig(method="svd", ratio=0.4, allocation="uniform"),
                       calibration=CalibrationConfig(source="generated", samples=2, seqlen=16))
    lines = []
    report = run(config, progress=False, echo=lines.append)
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    t = written["throughput"]
    assert t == json.loads(json.dumps(report["throughput"]))
    assert t["provider"] in (CPU, CUDA)
    settings = ThroughputSettings(**t["settings"])
    for row in (t["dense"], t["compressed"], t["eager"]["dense"], t["eager"]["compressed"]):
        assert_rates_follow_the_protocol(row, settings)
    assert t["speedup_decode"] == pytest.approx(t["compressed"]["decode_tokens_s"] / t["dense"]["decode_tokens_s"])
    weights = t["weight_bytes_per_token"]  # the compressed bytes counted here from report.json's ranks
    saved = sum(m * n - e["rank"] * (m + n) for e in written["layers"].values() for m, n in [e["shape"]])
    assert weights["compressed"] == weights["dense"] - weights["element_size"] * saved
    assert t["bound_decode_speedup"] == pytest.approx(weights["dense"] / weights["compressed"])
    assert "## Throughput" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "report.png").exists()
    assert any(line.startswith("throughput ") for line in lines)
    assert not list(tmp_path.glob(".out.dense-onnx-*")), "the dense work folder must be removed"

    # examples/serve_onnx.py on the same folder: its greedy text equals PyTorch's on the compressed model
    from transformers import AutoTokenizer

    from exporter import load_compressed
    out = tmp_path / "out"
    served = subprocess.run([sys.executable, str(ROOT / "examples" / "serve_onnx.py"), str(out), "abc",
                             "--max-new-tokens", "6"], capture_output=True, text=True, check=True).stdout.strip()
    tokenizer, model = AutoTokenizer.from_pretrained(out), load_compressed(out)
    ids = tokenizer("abc", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in greedy:
        greedy = greedy[:greedy.index(tokenizer.eos_token_id)]
    assert served == "abc" + tokenizer.decode(greedy)


def test_validate_throughput_needs_the_onnx_format(tmp_path):
    with pytest.raises(ValueError, match="add --format onnx"):
        run(RunConfig(out=str(tmp_path / "o"), formats=("safetensors",), validations=("throughput",)))


def test_bench_cli_on_a_folder_without_report_is_one_error_line(tmp_path):
    result = CliRunner().invoke(bench_main, [str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"svd-export-bench: error: {tmp_path} has no report.json: "
                                                  "not an svd-export output folder"]


def test_run_config_round_trips_validate():
    config = RunConfig(formats=("onnx",), validations=("throughput",))
    assert RunConfig.from_json(config.to_json()) == config
