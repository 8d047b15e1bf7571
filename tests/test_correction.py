"""--correction-rank (exporter/quantize/correction.py): W ≈ Q(W) + up·down, the rank-r correction of the grid's
error truncated the SVD-LLM V2 way. Its defining property: ‖(W − Q − up·down)X‖ is the minimum any rank-r
correction reaches, √Σ_{i>r} σ_i((W − Q)X)², also where X Xᵀ is singular. Then: the loop ships it, the graph
computes it (MatMulNBits + a float pair), the artifact reloads it, a killed run resumes to it."""
from __future__ import annotations

import dataclasses

import onnx
import pytest
import torch
import torch.nn as nn
from conftest import Killed, random_batches, tiny_model
from onnx_helpers import char_tokenizer, tiny_model_dir
from test_streaming import TEXT, config

from exporter.config import CalibrationConfig, CompressionConfig, Quantization
from exporter.loop.compress import compress_
from exporter.model.corrected import CorrectedLinear, grid_linears
from exporter.model.quantized import scales_of
from exporter.onnx.fused import build_onnx
from exporter.onnx.fused.reference import round_like_export
from exporter.quantize.correction import correct_linear_
from exporter.quantize.grid import round_to_nearest
from exporter.quantize.layer import put_on_grid_
from exporter.report.summary import summary
from exporter.run import run
from exporter.validate.ort_session import OrtDecoder
from exporter.validate.parity import parity

Q = Quantization(bits=4, block_size=16, accuracy_level=0)


@pytest.mark.parametrize("samples", [200, 12])  # 12 < 48 inputs: X Xᵀ is singular
def test_the_correction_reaches_the_minimum_loss_of_any_rank_r_correction(samples):
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(32, 48, generator=gen, dtype=torch.float64)
    x = torch.randn(48, samples, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 48, dtype=torch.float64)[:, None]
    layer = nn.Module()
    layer.proj = nn.Linear(48, 32, bias=True, dtype=torch.float64)
    put_on_grid_(layer.proj, *round_to_nearest(dense, Q, torch.float32))
    quantized = layer.proj.weight.detach().clone()
    record = correct_linear_(layer, "proj", dense, x @ x.T, rank=5)
    module = layer.proj
    assert isinstance(module, CorrectedLinear) and module.base.weight is layer.proj.base.weight
    up, down = module.correction.up.weight.detach(), module.correction.down.weight.detach()
    sigma = torch.linalg.svdvals((dense - quantized) @ x)
    minimum = float(sigma[5:].square().sum().sqrt())
    achieved = float(torch.linalg.matrix_norm((dense - quantized - up @ down) @ x))
    assert record["loss"] == pytest.approx(achieved, rel=1e-9) and record["loss_min"] == pytest.approx(minimum, rel=1e-9)
    assert achieved == pytest.approx(minimum, rel=1e-9)
    assert record["loss_before"] == pytest.approx(float(torch.linalg.matrix_norm((dense - quantized) @ x)), rel=1e-9)
    # the plain (unweighted) truncation of the residual does worse on the same inputs
    u, s, vh = torch.linalg.svd(dense - quantized)
    plain = float(torch.linalg.matrix_norm((dense - quantized - (u[:, :5] * s[:5]) @ vh[:5]) @ x))
    assert achieved < plain
    # the module computes Q x + up·down x + b, and only its base is on the grid
    inputs = torch.randn(3, 48, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(module(inputs), inputs @ (quantized + up @ down).T + module.base.bias)
    assert list(grid_linears(layer)) == [module.base]


@pytest.fixture(scope="module")
def corrected_model():
    """A tiny Llama, GPTQ alone (--ratio 0) with a rank-3 correction beside every decoder linear."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    result = compress_(model, random_batches(8, seqlen=32),
                       CompressionConfig(ratio=0.0, quantization=Q, correction_rank=3), progress=False)
    return model, result


def test_the_loop_corrects_every_dense_decoder_linear_and_counts_its_parameters(corrected_model):
    model, result = corrected_model
    corrected = [m for m in model.model.layers.modules() if isinstance(m, CorrectedLinear)]
    assert len(corrected) == 7 * len(model.model.layers) == len(result.extra["corrections"])
    assert all(scales_of(m.base) is not None and scales_of(m.correction.up) is None for m in corrected)
    records = [r["correction"] for r in result.extra["quantize"].values()]
    assert all(r["loss"] < r["loss_before"] and r["loss"] == pytest.approx(r["loss_min"], rel=1e-3, abs=1e-6)
               for r in records), records
    dense, after = result.linear_params()
    assert after - dense == sum(3 * (m.base.in_features + m.base.out_features) for m in corrected)


def test_the_graph_computes_what_the_loop_shipped(corrected_model, tmp_path):
    """The base as MatMulNBits, the correction as two float MatMuls added to it: equal to PyTorch as float32
    arithmetic allows (accuracy level 0), where the reference leaves the correction unrounded."""
    model, _ = corrected_model
    path = build_onnx(model, char_tokenizer(), tmp_path, quantization=Q)
    ops = [n.op_type for n in onnx.load(path, load_external_data=False).graph.node]
    linears = 7 * len(model.model.layers)
    assert ops.count("MatMulNBits") == linears + 1 and ops.count("MatMul") >= 2 * linears  # + lm_head
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    result = parity(round_like_export(model, Q), OrtDecoder.load(path), ids, "float32", steps=3, new_tokens=8)
    assert result["passed"] and result["max_abs_diff"] < 1e-5, result


@pytest.mark.parametrize("kill", [False, True])
def test_a_run_ships_reloads_and_resumes_the_corrected_model(tmp_path, kill, monkeypatch):
    """The CLI's path: the fused graph passes its own checks, report.json counts the corrections, the
    safetensors reload (load_compressed rebuilds the pairs), and a run killed after its first layer resumes to
    the same artifact."""
    from safetensors.torch import load_file

    from exporter.output.artifact import load_compressed
    from exporter.output.shards import ShardWriter
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 20)
    model_dir = tiny_model_dir("llama", tmp_path / "model")
    q = Quantization(bits=4, block_size=16)

    def setting(out):
        return dataclasses.replace(config(model_dir, out, text), formats=("safetensors", "onnx"), quantize="int4",
                                   block_size=16, compression=CompressionConfig(ratio=0.0, quantization=q,
                                                                                correction_rank=2),
                                   calibration=CalibrationConfig(source=str(text), samples=8, seqlen=32))
    whole = run(setting(tmp_path / "whole"), progress=False, echo=lambda *_: None)
    assert whole["onnx"]["parity"]["compressed"]["passed"]
    assert whole["onnx"]["rewritten_linears"] == 0 and whole["onnx"]["corrections"] == 14
    assert whole["recipe"].startswith("no low rank (--ratio 0)")
    assert whole["params"]["linears_compressed"] > whole["params"]["linears_dense"]
    assert f"correction   rank 2 beside {len(whole['method_details']['corrections'])} linears" in summary(whole)
    reloaded = load_compressed(tmp_path / "whole")
    assert sum(isinstance(m, CorrectedLinear) for m in reloaded.modules()) == len(whole["method_details"]["corrections"])
    if not kill:
        return
    real_write = ShardWriter.write_layer

    def write_layer(self, i, layer, prefix):
        if i == 1:
            raise Killed
        real_write(self, i, layer, prefix)
    monkeypatch.setattr(ShardWriter, "write_layer", write_layer)
    with pytest.raises(Killed):
        run(setting(tmp_path / "out"), progress=False, echo=lambda *_: None, resume=True)
    monkeypatch.undo()
    resumed = run(setting(tmp_path / "out"), progress=False, echo=lambda *_: None, resume=True)
    assert resumed["perplexity"] == whole["perplexity"]
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("whole", "out"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
