"""benchmarks/speed/gpu.py's document: it only formats the measured rows (speedup = compressed / dense tokens/s
of the same group: model, depth, rank rounding, protocol, device), and says which device and command printed
them."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python -m pytest` in the root puts it there; a bare `pytest` does not
    sys.path.insert(0, str(ROOT))


def load_gpu_script():
    """benchmarks.speed.gpu, as `python -m benchmarks.speed.gpu` imports it."""
    return importlib.import_module("benchmarks.speed.gpu")


def speed(decode):
    return {"prefill_tokens_s": 1000.0, "decode_tokens_s": decode, "end_to_end_tokens_s": decode / 2,
            "peak_gpu_mb": 2048.0}


def test_render_formats_measured_rows_only(tmp_path):
    gpu = load_gpu_script()
    env = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "onnxruntime": "1.31.1", "date": "2026-11-23 15:00 UTC",
           "command": "python -m benchmarks.speed.gpu throughput --model llama-2-7b"}
    settings = {"batch": 4, "prefill": 1024, "decode": 256, "warmup": 1, "repeats": 3}
    rows = [
        {"part": "throughput", "model": "llama-2-7b", "layers": 32, "ratio": 0.0, "provider": "CUDAExecutionProvider",
         "dtype": "float16", "settings": settings, "ort": speed(100.0), "eager": speed(50.0), **env},
        {"part": "throughput", "model": "llama-2-7b", "layers": 32, "ratio": 0.4, "provider": "CUDAExecutionProvider",
         "dtype": "float16", "settings": settings, "ort": speed(125.0), "eager": speed(60.0),
         "bound_decode_speedup": 1.5, **env},
        {"part": "compress", "model": "opt-6.7b", "layers": 32, "method": "svd-llm-v2", "ratio": 0.4,
         "calibration": "256x2048", "wall_s": 321.5, "peak_gpu_mb": 30000.0, "realized_linears": 0.4012, **env},
    ]
    rows.append({**rows[1], "rank_multiple": 64, "ort": speed(150.0)})  # a group without a dense row
    rows[2]["layer_seconds"] = {"profile": [10.0, 12.0], "compress": [9.0]}
    gpu.render(rows, tmp_path)
    text = (tmp_path / "gpu.md").read_text()
    # ORT prefill, decode, eager prefill, decode speedups and the bound
    assert "| 0.4 | 1,000.0 | 125.0 | 2,048 | 1,000.0 | 60.0 | 2,048 | 1.00 | 1.25 | 1.00 | 1.20 | 1.50 | 2.08 |" in text
    assert "| 0.0 | 1,000.0 | 100.0 | 2,048 | 1,000.0 | 50.0 | 2,048 | 1.00 | 1.00 | 1.00 | 1.00 | – | 2.00 |" in text
    assert "ranks a multiple of 1 " in text and "ranks a multiple of 64 " in text
    assert "| 0.4 | 1,000.0 | 150.0 | 2,048 | 1,000.0 | 60.0 | 2,048 | – | – | – | – | 1.50 | 2.50 |" in text
    # (10 + 12) / 2 + 9 = 20 s per layer, × 32 layers = 10.7 min
    assert ("| opt-6.7b | svd-llm-v2 + v2 | 32 | 256x2048 | 321.5 | 11.0 | 9.0 | 10.7 | 30,000 | 0.4012 | "
            "NVIDIA H100 80GB HBM3 |") in text
    assert "python -m benchmarks.speed.gpu throughput --model llama-2-7b" in text
    assert (tmp_path / "gpu_speedup.png").read_bytes()[:4] == b"\x89PNG"


def test_throughput_part_runs_on_a_cpu_with_a_shrunk_shape(tmp_path, monkeypatch):
    """The device only runs what was run here first: the throughput part, fused (the CLI's graph, shared KV
    buffer) and plain, on a Llama shape shrunk to a few kB, with the CPU provider. One row per ratio, each
    saying which graph it measured; CUDA graphs are refused on the CPU provider."""
    import argparse

    import pytest
    gpu = load_gpu_script()
    tiny = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    monkeypatch.setitem(gpu.SHAPES, "llama-2-7b", ("LlamaConfig", tiny))
    base = dict(layers=None, ratios=[0.0, 0.4], rank_multiple=8, provider="cpu", device="cpu", dtype="float32",
                batch=2, prefill=8, decode=4, warmup=1, repeats=1, work=tmp_path, cuda_graph=False)
    for graph in ("fused", "plain"):
        rows = list(gpu.part_throughput("llama-2-7b", argparse.Namespace(**base, graph=graph)))
        assert [(r["ratio"], r["graph"], r["cuda_graph"]) for r in rows] == [(0.0, graph, False), (0.4, graph, False)]
        for r in rows:  # tokens/s are the protocol's 2 x 4 decoded tokens over the measured time
            for row in (r["ort"], r["eager"]):
                assert row["decode_tokens_s"] == pytest.approx(2 * 4 / row["decode_s"])
        assert rows[1]["bound_decode_speedup"] > 1.0
    with pytest.raises(ValueError, match="CUDA graphs need"):
        list(gpu.part_throughput("llama-2-7b", argparse.Namespace(**{**base, "ratios": [0.0], "cuda_graph": True},
                                                                  graph="fused")))
