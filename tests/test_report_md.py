"""report.md and report.png from a report.json-shaped dict: every number shown comes from the report,
the heat map puts each rank in its (layer, matrix type) cell, for any allocation."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import random_batches, tiny_model

from exporter import CompressionConfig, compress_
from exporter.report.markdown import render, write_report_md
from exporter.report.plots import rank_grid


def report_from_run(ratio: float = 0.4) -> dict:
    model = tiny_model("llama")
    result = compress_(model, random_batches(), CompressionConfig(method="svd", ratio=ratio, allocation="uniform"),
                       progress=False)
    dense, after = result.linear_params()
    return {
        "tool": "svd-export test", "model": "tiny-llama", "source": "random",
        "method": result.method, "allocation": result.allocation, "propagate": "original",
        "ratio": {"requested": ratio, "realized_linears": 1 - after / dense, "realized_model": 0.1234},
        "params": {"dense_total": 1000, "compressed_total": 877, "linears_dense": dense, "linears_compressed": after},
        "perplexity": {"dense": 12.5, "compressed": 15.0, "onnx_compressed": 15.01, "tokens": 4096, "window": 128, "source": "wikitext2"},
        "dense_linears": len(result.matrices) - len(result.plan),
        "layers": {name: {"rank": rec.rank, "loss": rec.loss, "loss_min": rec.loss_min, "shape": list(rec.shape)}
                   for name, rec in result.records.items()},
        "timings_s": {"compress": 1.5},
    }


def speed(prefill, decode, e2e, gpu=None):
    return {"prefill_tokens_s": prefill, "decode_tokens_s": decode, "end_to_end_tokens_s": e2e, "peak_gpu_mb": gpu}


def test_rank_grid_places_every_rank_in_its_cell():
    layers = {
        "model.layers.0.self_attn.q_proj": {"rank": 8, "shape": [64, 64]},
        "model.layers.1.self_attn.q_proj": {"rank": 16, "shape": [64, 64]},
        "model.layers.1.mlp.down_proj": {"rank": 10, "shape": [64, 128]},  # layer 0's down_proj stayed dense
    }
    rows, cols, kept, ranks = rank_grid(layers)
    assert rows == [0, 1] and cols == ["q_proj", "down_proj"]
    assert ranks.tolist() == [[8, 0], [16, 10]]
    assert kept[1, 1] == pytest.approx(10 * (64 + 128) / (64 * 128))
    assert np.isnan(kept[0, 1])


def test_rank_grid_refuses_a_name_without_layer_index():
    with pytest.raises(ValueError, match="no decoder-layer index"):
        rank_grid({"lm_head": {"rank": 4, "shape": [8, 8]}})


def test_report_md_and_png(tmp_path):
    report = report_from_run()
    report["throughput"] = {
        "provider": "CPUExecutionProvider",
        "settings": {"batch": 1, "prefill": 32, "decode": 8, "warmup": 1, "repeats": 3},
        "dense": speed(1000.0, 50.0, 40.0), "compressed": speed(1500.0, 70.0, 55.0),
        "speedup_decode": 1.4, "bound_decode_speedup": 1.61,
        "eager": {"device": "cpu", "dense": speed(900.0, 45.0, 35.0), "compressed": None,
                  "note": "no compressed PyTorch model"},
    }
    path = write_report_md(report, tmp_path)
    text = path.read_text()
    assert f"{report['ratio']['realized_linears']:.4f}" in text
    assert "| dense | 12.500 |" in text and "| compressed | 15.000 | 1.200× |" in text
    assert "| compressed (ONNX Runtime) | 15.010 | 1.201× |" in text
    assert "| ORT compressed | 1,500.0 | 70.0 | 55.0 | – |" in text
    assert "**1.400×**" in text and "1.610×" in text
    assert "| PyTorch eager compressed (cpu) | – |" in text and "no compressed PyTorch model" in text
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    ranks = sorted(rec["rank"] for rec in report["layers"].values() if rec["shape"] == [64, 64])
    assert f"| q_proj | 64×64 | 2 | {ranks[0]} |" in text


def test_report_without_perplexity_or_throughput(tmp_path):
    report = report_from_run(ratio=0.2)
    report["perplexity"] = None
    text = render(report)
    assert "Perplexity" not in text and "Throughput" not in text and "## Ranks" in text
    report["layers"] = {}
    write_report_md(report, tmp_path)
    assert "every linear stayed dense" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "report.png").exists()
