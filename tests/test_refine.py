"""--refine block: gradient descent on each layer's factors towards the dense layer's output (exporter/refine/optimise.py)."""
import json

import pytest
import torch
from conftest import Killed, die_after_layer, random_batches, tiny_model
from families import FAMILIES, family_model
from onnx_helpers import tiny_model_dir

from exporter import CompressionConfig, compress_
from exporter.model.discovery import architecture_of
from exporter.model.architecture import decoder_layers
from exporter.config import Refinement, CalibrationConfig, EvalConfig, RunConfig
from exporter.model.lowrank import LowRankLinear, swap_module
from exporter.run import run
from exporter.refine.optimise import factors, split_batches
from exporter.refine.block import objective, refine_layer
from exporter.load.checkpoint import CheckpointSource
from exporter.model.activations import advance
from exporter.model.layer_inputs import capture_inputs

TEXT = "The quick brown fox jumps over the lazy dog. " * 40 + "Pack my box with five dozen liquor jugs! " * 40


def refined(arch, steps, ratio=0.4, samples=8, **options):
    model = tiny_model(arch)
    config = CompressionConfig(method="svd-llm-v2", ratio=ratio, allocation="uniform", refine="block",
                               refine_steps=steps, **options)
    return model, compress_(model, random_batches(samples, 32, batch_size=1), config, progress=False)


def truncated_layer(arch):
    """Layer 0 of a tiny model with every linear replaced by a plain truncated SVD (far from its dense output),
    its inputs, and the dense layer's outputs on them."""
    model = tiny_model(arch)
    spec = architecture_of(model)
    stream = capture_inputs(model, spec, random_batches(8, 32, batch_size=1), "cpu")
    layer = decoder_layers(model, spec)[0]
    targets = stream.copy()
    advance(0, layer, targets, "cpu")
    for path in spec.linear_names():
        w = layer.get_submodule(path)
        u, s, vh = torch.linalg.svd(w.weight.detach(), full_matrices=False)
        r = min(w.weight.shape) // 3
        swap_module(layer, path, LowRankLinear.from_factors(u[:, :r] * s[:r], vh[:r], w.bias, torch.float32, "cpu"))
    return layer, stream, targets


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_refinement_never_increases_its_objective_on_the_calibration_batches(arch):
    layer, inputs, targets = truncated_layer(arch)
    train, held = split_batches(len(inputs.hidden), 0.125)
    before = (objective(0, layer, inputs, targets, train, "cpu"), objective(0, layer, inputs, targets, held, "cpu"))
    entry = refine_layer(0, layer, inputs, targets, Refinement(steps=40, lr=1e-2), "cpu", torch.float32)
    after = (objective(0, layer, inputs, targets, train, "cpu"), objective(0, layer, inputs, targets, held, "cpu"))
    assert entry["kept"] and after[0] < 0.9 * before[0]  # a real gain, not rounding
    assert after[1] <= before[1]
    assert entry["loss_before"] == pytest.approx(before[0]) and entry["loss_after"] == pytest.approx(after[0])


def test_a_refinement_that_does_not_help_restores_the_closed_form_exactly():
    layer, inputs, targets = truncated_layer("llama")
    start = [p.detach().clone() for p in factors(layer)]
    # a step far too large: every state is worse than the closed form on the held-out batch
    entry = refine_layer(0, layer, inputs, targets, Refinement(steps=8, lr=50.0, eval_every=1), "cpu",
                         torch.float32)
    assert not entry["kept"] and entry["best_step"] == 0
    assert all(torch.equal(a, b) for a, b in zip(start, factors(layer)))


def test_zero_steps_reproduce_the_closed_form_factors_exactly():
    closed = tiny_model("llama")
    compress_(closed, random_batches(8, 32, batch_size=1), CompressionConfig(
        method="svd-llm-v2", ratio=0.4, allocation="uniform", propagate="compressed"), progress=False)
    model, result = refined("llama", steps=0)
    a, b = closed.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(e["steps_run"] == 0 and not e["kept"] for e in result.extra["refine"].values())


def test_runs_on_every_architecture(arch):
    model, result = refined(arch, steps=40, ratio=0.6, samples=16, refine_lr=1e-2)
    entries = result.extra["refine"]
    seconds = result.layer_seconds  # per layer: the compression pass, and the stages inside it
    assert all(len(seconds[k]) == 2 for k in ("compress", "observe", "factorize", "refine"))
    assert all(seconds["observe"][i] + seconds["factorize"][i] + seconds["refine"][i] <= seconds["compress"][i]
               for i in range(2))
    for e in entries.values():
        assert e["loss_after"] <= e["loss_before"] and e["holdout_after"] <= e["holdout_before"]
    assert any(e["kept"] and e["loss_after"] < e["loss_before"] for e in entries.values())
    # the records describe the factors as they now are: loss still at or above the closed form's minimum
    assert all(rec.loss >= rec.loss_min * (1 - 1e-6) for rec in result.records.values())
    ids = random_batches()[0]
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_runs_on_every_discovered_family(family):
    """Every family the family tests cover (MoE experts, fused projections, Conv1D, sliding-window and
    per-layer keyword arguments included): the refined layers run and their objective never rises."""
    model = family_model(family)
    config = CompressionConfig(method="svd-llm-v2", ratio=0.6, allocation="uniform", refine="block",
                               refine_steps=40, refine_lr=1e-2)
    result = compress_(model, random_batches(16, 32, batch_size=1), config, progress=False)
    entries = result.extra["refine"]
    assert set(entries) == {"0", "1"}
    for e in entries.values():
        assert e["loss_after"] <= e["loss_before"] and e["holdout_after"] <= e["holdout_before"]
    assert any(e["kept"] for e in entries.values())  # refined factors, whose records were recomputed
    assert all(rec.loss >= rec.loss_min * (1 - 1e-6) for rec in result.records.values())
    assert torch.isfinite(model(input_ids=random_batches()[0]).logits).all()


def test_refinement_settings_are_checked():
    with pytest.raises(ValueError, match="propagate original"):
        CompressionConfig(refine="block", propagate="original")
    with pytest.raises(ValueError, match="refine-steps"):
        CompressionConfig(refine="block", refine_steps=-1)
    with pytest.raises(ValueError, match="refine-holdout"):
        CompressionConfig(refine="block", refine_holdout=1.0)
    with pytest.raises(ValueError, match="unknown --refine"):
        CompressionConfig(refine="everything")
    assert CompressionConfig(refine="block").propagation == "compressed"
    with pytest.raises(ValueError, match="at least 2"):
        compress_(tiny_model("llama"), random_batches(2, 32, batch_size=2),
                  CompressionConfig(ratio=0.4, allocation="uniform", refine="block"), progress=False)


def test_resume_after_a_refined_layer_gives_the_same_artifacts(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM
    from safetensors.torch import load_file
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    model_dir = tiny_model_dir("llama", tmp_path / "model")
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir, num_hidden_layers=3)).save_pretrained(model_dir)

    def config(out):
        return RunConfig(model=str(model_dir), out=str(out),
                         compression=CompressionConfig(method="adasvd", ratio=0.4, allocation="uniform",
                                                       refine="block", refine_steps=16),
                         calibration=CalibrationConfig(source=str(text), samples=4, seqlen=64),
                         evaluation=EvalConfig(str(text), 512, 128))

    whole = run(config(tmp_path / "whole"), progress=False, echo=lambda *_: None)
    assert any(e["kept"] for e in whole["method_details"]["refine"].values())

    die_after_layer(monkeypatch, 1)
    with pytest.raises(Killed):
        run(config(tmp_path / "out"), progress=False, echo=lambda *_: None, resume=True)
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert json.loads((partial[0] / ".resume" / "state.json").read_text())["next"] == 1
    monkeypatch.undo()  # the writer lives again
    materialised = []
    monkeypatch.setattr(CheckpointSource, "materialize",
                        lambda self, i, _m=CheckpointSource.materialize: materialised.append(i) or _m(self, i))
    resumed = run(config(tmp_path / "out"), progress=False, echo=lambda *_: None, resume=True)
    assert materialised == [0, 1, 2]  # discovery's forward of one layer, then layers 1-2: 0 was not compressed again
    assert resumed["perplexity"] == whole["perplexity"] and resumed["layers"] == whole["layers"]
    strip = lambda d: {k: {f: v for f, v in e.items() if f != "seconds"} for k, e in d.items()}  # noqa: E731
    assert strip(resumed["method_details"]["refine"]) == strip(whole["method_details"]["refine"])
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_flags_are_restored_after_the_optimisation():
    model, result = refined("llama", steps=8)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        refine_layer(0, *truncated_layer("llama"), Refinement(steps=2), "cpu", torch.float32)
        assert not torch.is_grad_enabled()  # the caller's no-grad mode is back after the optimisation


def test_refinement_settings_are_part_of_the_resume_key():
    from exporter.run import run_key, run_settings

    def key(**options):
        return run_key(run_settings(RunConfig(model="m", out="o", compression=CompressionConfig(ratio=0.4, **options))))
    keys = {key(), key(refine="block"), key(refine="block", refine_steps=8), key(refine="block", refine_lr=1e-2),
            key(keep_dense_above=0.95)}
    assert len(keys) == 5


def test_summary_says_where_a_layer_s_time_goes():
    from exporter.report.summary import summary
    report = {"model": "m", "method": "adasvd", "propagate": "compressed",
              "ratio": {"requested": 0.4, "realized_linears": 0.4, "realized_model": 0.3},
              "params": {"dense_total": 10, "compressed_total": 7}, "dense_linears": 0, "timings_s": {},
              "peak_memory": {"host_rss_mb": 1.0}, "layers": {},
              "layer_seconds": {"profile": [1.0, 3.0], "compress": [10.0, 20.0], "observe": [2.0, 4.0],
                                "factorize": [5.0, 9.0], "refine": []}}
    assert "per layer    profile 2.0s, compress 15.0s, observe 3.0s, factorize 7.0s" in summary(report)
    assert "refine" not in summary(report)  # a stage that never ran is not averaged (no division by zero)
