"""--refine block: gradient descent on each layer's factors towards the dense layer's output (exporter/refine/optimise.py)."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import Killed, die_after_layer, random_batches, tiny_model
from families import FAMILIES, family_model
from onnx_helpers import tiny_model_dir

from exporter import CompressionConfig, compress_
from exporter.config import CalibrationConfig, EvalConfig, Refinement, RunConfig
from exporter.load.checkpoint import CheckpointSource
from exporter.model.activations import advance
from exporter.model.architecture import decoder_layers
from exporter.model.discovery import architecture_of
from exporter.model.layer_inputs import capture_inputs
from exporter.model.lowrank import LowRankLinear, swap_module
from exporter.refine.block import objective, refine_layer
from exporter.refine.optimise import factors, optimise, split_batches
from exporter.run import run

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


def layer_errors(dense, compressed, batches, index: int) -> tuple[float, float]:
    """Block refinement's objective of `compressed`'s layer `index`, computed here from the two models alone:
    its input is the calibration batches through the compressed layers before it, its target the dense
    layer's output on the batches through the dense layers. -> (training batches, held-out batches)."""
    arch = architecture_of(dense)
    original = capture_inputs(dense, arch, batches, "cpu")
    inputs = original.copy()
    for j in range(index):
        advance(j, decoder_layers(dense, arch)[j], original, "cpu")
        advance(j, decoder_layers(compressed, arch)[j], inputs, "cpu")
    advance(index, decoder_layers(dense, arch)[index], original, "cpu")
    layer = decoder_layers(compressed, arch)[index]
    return tuple(objective(index, layer, inputs, original, part, "cpu")
                 for part in split_batches(len(batches), Refinement().holdout))


def test_runs_on_every_architecture(arch):
    batches = random_batches(16, 32, batch_size=1)
    config = CompressionConfig(method="svd-llm-v2", ratio=0.6, allocation="uniform", refine="block",
                               refine_steps=40, refine_lr=1e-2)
    model = tiny_model(arch)
    result = compress_(model, batches, config, progress=False)
    entries = result.extra["refine"]
    assert all(len(result.layer_seconds[k]) == 2 for k in ("compress", "observe", "factorize", "refine"))
    assert any(e["kept"] and e["loss_after"] < 0.99 * e["loss_before"] for e in entries.values())
    # what each layer reports is the objective of the factors as stored, on the streams it must read: the
    # compressed stream at its input, the dense layer's output as its target (swapping them changes the numbers)
    for index in (0, 1):
        train, held = layer_errors(tiny_model(arch), model, batches, index)
        assert entries[str(index)]["loss_after"] == pytest.approx(train, rel=1e-5)
        assert entries[str(index)]["holdout_after"] == pytest.approx(held, rel=1e-5)
    # layer 0 sees the same inputs with and without refinement: its records describe the refined factors
    # exactly where the refinement was kept
    closed = compress_(tiny_model(arch), batches, dataclasses.replace(config, refine_steps=0), progress=False)
    layer0 = [n for n in closed.records if ".0." in n]
    changed = [n for n in layer0 if result.records[n].loss != closed.records[n].loss]
    assert (changed == layer0) if entries["0"]["kept"] else (changed == [])
    ids = random_batches()[0]
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_runs_on_every_discovered_family(family):
    """Every family the family tests cover (MoE experts, fused projections, Conv1D, sliding-window and
    per-layer keyword arguments included): the refined layers run and refinement lowers an objective."""
    model = family_model(family)
    config = CompressionConfig(method="svd-llm-v2", ratio=0.6, allocation="uniform", refine="block",
                               refine_steps=40, refine_lr=1e-2)
    result = compress_(model, random_batches(16, 32, batch_size=1), config, progress=False)
    entries = result.extra["refine"]
    assert set(entries) == {"0", "1"}
    assert any(e["kept"] and e["loss_after"] < 0.99 * e["loss_before"] for e in entries.values())
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
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
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


def onnx_factors(folder) -> dict[str, list]:
    """module name -> the float weights of its low-rank pair as the ONNX graph stores them (down, then up)."""
    import onnx_ir as ir

    from graph_rewrite.tags import LOWRANK_KEY
    graph = ir.load(folder / "model.onnx").graph
    pairs: dict[str, list] = {}
    for node in graph:
        if LOWRANK_KEY in node.metadata_props and node.op_type == "MatMul":
            pairs.setdefault(node.metadata_props[LOWRANK_KEY], []).append(node.inputs[1].const_value.numpy())
    return pairs


@pytest.mark.parametrize("refine", ["block", "block+e2e"])
def test_refined_factors_are_the_ones_in_the_onnx_graph(tmp_path, refine):
    """--refine then --format onnx: the graph carries the factors as refined (block: written layer by layer
    from the streamed checkpoint; block+e2e: rewritten after the loop from the model held whole), and passes
    its parity check against them."""
    from safetensors.torch import load_file
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    config = RunConfig(model=str(tiny_model_dir("llama", tmp_path / "model")), out=str(tmp_path / "out"),
                       formats=("safetensors", "onnx"), onnx_graph="fused",
                       compression=CompressionConfig(method="svd-llm-v2", ratio=0.6, allocation="uniform",
                                                     refine=refine, refine_steps=16, refine_lr=1e-2),
                       calibration=CalibrationConfig(source=str(text), samples=8, seqlen=64),
                       evaluation=EvalConfig(str(text), 512, 128))
    report = run(config, progress=False, echo=lambda *_: None)
    details = report["method_details"]
    assert any(e["kept"] for e in details["refine"].values())
    if refine == "block+e2e":
        assert details["refine_e2e"]["steps_run"] > 0
    assert all(p["passed"] for p in report["onnx"]["parity"].values())
    stored = load_file(str(tmp_path / "out" / "model.safetensors"))
    pairs = onnx_factors(tmp_path / "out")
    assert set(pairs) == set(report["layers"])
    for name, (down, up) in pairs.items():  # MatMul weights are Wᵀ: K×N
        assert np.array_equal(down, stored[f"{name}.down.weight"].numpy().T)
        assert np.array_equal(up, stored[f"{name}.up.weight"].numpy().T)


def test_block_refinement_on_a_float16_streamed_source(tmp_path):
    """A half-precision checkpoint streamed layer by layer and computed in float16: refinement optimises in
    float32 and hands back every parameter and buffer in its own dtype; the layers are written in float16."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from exporter.loop.compress import compress_source
    from exporter.output.shards import ShardWriter
    folder = tiny_model_dir("llama", tmp_path / "model")
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).save_pretrained(folder)
    source = CheckpointSource(folder, "cpu", compute_dtype=torch.float16)
    buffers = {name: b.dtype for name, b in source.model.named_buffers()}
    writer = ShardWriter(tmp_path, torch.float16)
    config = CompressionConfig(method="svd-llm-v2", ratio=0.6, allocation="uniform", refine="block",
                               refine_steps=16, refine_lr=1e-2)
    result, _ = compress_source(source, random_batches(8, 32, batch_size=1), config, writer=writer,
                                export_dtype=torch.float16, progress=False)
    entries = result.extra["refine"]
    assert any(e["kept"] and e["loss_after"] < e["loss_before"] for e in entries.values())
    assert {name: b.dtype for name, b in source.model.named_buffers()} == buffers
    assert all(p.dtype == torch.float16 for p in source.model.parameters())
    for i in range(2):
        written = load_file(str(tmp_path / f".shard-layer-{i:05d}.safetensors"))
        assert written and all(v.dtype == torch.float16 and torch.isfinite(v).all() for v in written.values())


def test_an_interrupted_refinement_leaves_the_layer_as_it_came_in():
    """An error (or an interrupt) inside the optimisation: the closed-form factors come back exactly, and every
    parameter and buffer its dtype and gradient flag."""
    layer, inputs, targets = truncated_layer("llama")
    layer.half()
    layer.get_submodule("self_attn.q_proj").up.weight.requires_grad_(False)
    before = {name: t.detach().clone() for name, t in layer.state_dict().items()}
    flags = {name: p.requires_grad for name, p in layer.named_parameters()}
    calls = []

    def failing(_, b):
        calls.append(b)
        if len(calls) > 12:  # after a few steps have moved the factors
            raise KeyboardInterrupt
        out = layer(inputs.hidden[b].half(), **inputs.kwargs_for(0)[b])
        out = out[0] if isinstance(out, tuple) else out
        return (out.float() - targets.hidden[b].float()).square().sum(), out.shape[1]
    train, held = split_batches(len(inputs.hidden), 0.125)
    with pytest.raises(KeyboardInterrupt):
        optimise(layer, failing, train, held, Refinement(steps=40, lr=1e-2, eval_every=50), seed=0,
                 export_dtype=torch.float16)
    after = layer.state_dict()
    assert after.keys() == before.keys()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    assert {name: p.requires_grad for name, p in layer.named_parameters()} == flags


def test_the_never_worse_check_can_run_on_a_fixed_subset_of_the_training_batches():
    from exporter.refine.optimise import check_subset
    assert check_subset(list(range(14)), 0) == list(range(14)) and check_subset([3, 4], 5) == [3, 4]
    assert check_subset(list(range(14)), 4) == [0, 4, 9, 13]  # evenly spaced, both ends
    layer, inputs, targets = truncated_layer("llama")
    entry = refine_layer(0, layer, inputs, targets, Refinement(steps=16, lr=1e-2, check_batches=3), "cpu",
                         torch.float32)
    train, _ = split_batches(len(inputs.hidden), 0.125)
    assert entry["check_batches"] == 3
    assert entry["loss_after"] == pytest.approx(objective(0, layer, inputs, targets, check_subset(train, 3), "cpu"))


def test_a_blended_target_is_what_block_refinement_fits():
    """refine_target_strength β: layer 1 is fitted to β·dense(X_o) + (1 − β)·dense(X_c), X_c its input through the
    compressed layer 0: its reported objective is that target's, computed here from the two models."""
    batches = random_batches(16, 32, batch_size=1)
    config = CompressionConfig(method="svd-llm-v2", ratio=0.6, allocation="uniform", refine="block",
                               refine_steps=16, refine_lr=1e-2, refine_target_strength=0.5)
    model = tiny_model("llama")
    entries = compress_(model, batches, config, progress=False).extra["refine"]
    dense = tiny_model("llama")
    arch = architecture_of(dense)
    original = capture_inputs(dense, arch, batches, "cpu")
    inputs = original.copy()
    advance(0, decoder_layers(dense, arch)[0], original, "cpu")
    advance(0, decoder_layers(model, arch)[0], inputs, "cpu")
    on_compressed = inputs.copy()
    advance(1, decoder_layers(dense, arch)[1], original, "cpu")
    advance(1, decoder_layers(dense, arch)[1], on_compressed, "cpu")
    blended = original.copy()
    blended.hidden = [0.5 * a + 0.5 * b for a, b in zip(original.hidden, on_compressed.hidden)]
    train, held = split_batches(len(batches), 0.125)
    layer = decoder_layers(model, arch)[1]
    assert entries["1"]["loss_after"] == pytest.approx(objective(1, layer, inputs, blended, train, "cpu"), rel=1e-5)
    assert entries["1"]["loss_after"] != pytest.approx(objective(1, layer, inputs, original, train, "cpu"), rel=1e-3)


def test_the_cosine_schedule_warms_up_then_decays_to_zero_at_the_last_step(monkeypatch):
    """Refinement(schedule="cosine") (--e2e-schedule): the step size rises linearly over the first steps/8, then
    falls as a cosine to 0 at `steps`; "constant" keeps it. The optimiser takes exactly those step sizes."""
    from exporter.refine.optimise import step_scale
    cosine = Refinement(steps=64, schedule="cosine")
    scales = [step_scale(cosine, s) for s in range(64)]
    assert scales[:8] == [(s + 1) / 8 for s in range(8)]
    assert scales[8] == 1.0 and all(a > b for a, b in zip(scales[8:], scales[9:]))
    assert 0 < scales[-1] < 1e-2
    assert step_scale(cosine, 64) == pytest.approx(0.0, abs=1e-12)
    assert all(step_scale(Refinement(steps=64), s) == 1.0 for s in range(80))
    with pytest.raises(ValueError, match="unknown step-size schedule"):
        Refinement(steps=8, schedule="linear")
    with pytest.raises(ValueError, match="--e2e-schedule sets the step sizes of end-to-end refinement"):
        CompressionConfig(refine="block", e2e_schedule="cosine")
    assert CompressionConfig(refine="block+e2e", e2e_schedule="cosine").e2e_refinement.schedule == "cosine"
    assert CompressionConfig(refine="block+e2e", e2e_schedule="cosine").refinement.schedule == "constant"

    layer, inputs, targets = truncated_layer("llama")
    taken, real_step = [], torch.optim.Adam.step

    def step(self, *args, **kwargs):
        taken.append(self.param_groups[0]["lr"] / self.param_groups[0]["initial_lr"])
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.Adam, "step", step)

    def error(f, b):
        out = f(inputs.hidden[b], **inputs.kwargs_for(0)[b])
        out = out[0] if isinstance(out, tuple) else out
        return (out - targets.hidden[b]).square().sum(), out.shape[1]
    train, held = split_batches(len(inputs.hidden), 0.125)
    settings = Refinement(steps=16, lr=1e-3, eval_every=16, schedule="cosine")
    optimise(layer, error, train, held, settings, seed=0, export_dtype=torch.float32)
    assert taken == pytest.approx([step_scale(settings, s) for s in range(16)], rel=1e-6)
