"""The streamed path (a checkpoint read one decoder layer at a time) against the resident one, the
one-layer memory bound, resume after a kill, sharded output, and refused checkpoints."""
import json
import shutil

import pytest
import torch
from conftest import Killed, die_after_layer, random_batches, tiny_model
from onnx_helpers import tiny_model_dir
from safetensors.torch import load_file, save_file

from exporter import CompressionConfig, compress_, load_compressed
from exporter.config import CalibrationConfig, EvalConfig, RunConfig
from exporter.data.windows import calibration_batches, evaluation_tokens
from exporter.load.checkpoint import CheckpointSource
from exporter.load.files import CheckpointError
from exporter.output.resume_state import ResumeError
from exporter.run import run
from exporter.validate.perplexity import perplexity, torch_logits

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 + "Pack my box with five dozen liquor jugs! " * 40)


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def config(model_dir, out, text, method="svd-llm-v2", allocation="uniform", **compression):
    return RunConfig(model=str(model_dir), out=str(out),
                     compression=CompressionConfig(method=method, ratio=0.4, allocation=allocation, **compression),
                     calibration=CalibrationConfig(source=str(text), samples=4, seqlen=64),
                     evaluation=EvalConfig(str(text), 512, 128))


def resident_run(model_dir, text, compression: CompressionConfig):
    """Today's resident path: the whole model in memory, compress_, then a whole-model perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # as the pipeline loads it
    batches = calibration_batches(model, tokenizer, str(text), 4, 64, 0)
    ids = evaluation_tokens(model, tokenizer, str(text), 512, 128)
    dense = perplexity(torch_logits(model), ids, 128, progress=False)
    result = compress_(model, batches, compression, progress=False)
    return model, result, dense, perplexity(torch_logits(model), ids, 128, progress=False)


@pytest.mark.parametrize("arch,method,allocation", [("llama", "svd-llm-v2", "uniform"), ("opt", "svd-llm-v2", "v2"),
                                                    ("mistral", "adasvd", "adacr"), ("qwen2", "svd-llm", "uniform"),
                                                    ("llama", "adasvd", "global-fisher")])
def test_streamed_equals_resident(tmp_path, text, arch, method, allocation):
    model_dir = tiny_model_dir(arch, tmp_path / "model")
    if allocation == "v2":  # HF's init (std 0.02) gives truncation losses <= 1, where 1/log L is undefined
        model = tiny_model(arch)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(10)
        model.save_pretrained(model_dir)
    cfg = config(model_dir, tmp_path / "out", text, method, allocation)
    report = run(cfg, progress=False, echo=lambda *_: None)
    assert report["streamed"]
    model, result, dense, compressed = resident_run(model_dir, text, cfg.compression)
    assert report["perplexity"]["dense"] == pytest.approx(dense, rel=1e-6)
    assert report["perplexity"]["compressed"] == pytest.approx(compressed, rel=1e-5)
    assert {k: v["rank"] for k, v in report["layers"].items()} == result.plan
    saved, state = load_file(str(tmp_path / "out" / "model.safetensors")), model.state_dict()
    assert set(saved) <= set(state) and set(state) - set(saved) <= {"lm_head.weight"}  # tied: stored once
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, state[name], rtol=1e-5, atol=1e-6, msg=name)
    for name, rec in result.records.items():
        assert report["layers"][name]["loss"] == pytest.approx(rec.loss, rel=1e-5)


@pytest.mark.parametrize("allocation,passes", [
    ("adacr", [0, 0, 1, 0, 1]),  # discovery's one forward, the profile pass, the compression pass
    ("global-fisher", [0, 0, 1, 1, 0, 0, 1, 0, 1]),  # and, before the profile pass, the sensitivity pass's two walks
])
def test_at_most_one_decoder_layer_is_materialised(tmp_path, text, monkeypatch, allocation, passes):
    model_dir = tiny_model_dir("llama", tmp_path / "model")
    seen = []

    def checked(self, i):
        layers = self.model.model.layers
        real = [j for j, layer in enumerate(layers) if any(p.device.type != "meta" for p in layer.parameters())]
        seen.append((i, real))
        return original(self, i)

    original = CheckpointSource.materialize
    monkeypatch.setattr(CheckpointSource, "materialize", checked)
    report = run(config(model_dir, tmp_path / "out", text, method="svd", allocation=allocation), progress=False,
                 echo=lambda *_: None)
    assert report["streamed"]
    assert [i for i, _ in seen] == passes
    assert all(real == [] for _, real in seen), seen  # every other layer was back on `meta`


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_streamed_onnx_is_written_layer_by_layer_and_matches_the_resident_graph(tmp_path, text, arch, monkeypatch):
    """--format onnx on a streamed checkpoint: both fused graphs are written one decoder layer at a time (never
    two real layers), validated by streamed parity, and the compressed graph is the one a resident run writes."""
    import numpy as np
    import onnx
    from onnx.numpy_helper import to_array

    from exporter.load.written import WrittenSource
    from exporter.model.discovery import find_decoder_layers

    model_dir = tiny_model_dir(arch, tmp_path / "model")
    seen = []

    def checked(original):
        def materialize(self, i):
            layers = self.model.get_submodule(find_decoder_layers(self.model))
            seen.append([j for j, layer in enumerate(layers) if any(p.device.type != "meta" for p in layer.parameters())])
            return original(self, i)
        return materialize

    for cls in (CheckpointSource, WrittenSource):
        monkeypatch.setattr(cls, "materialize", checked(cls.materialize))
    cfg = config(model_dir, tmp_path / "out", text)
    cfg = RunConfig(**{**cfg.__dict__, "formats": ("safetensors", "onnx")})
    report = run(cfg, progress=False, echo=lambda *_: None)
    assert report["streamed"] and report["onnx"]["graph"] == "fused"
    assert all(real == [] for real in seen), seen
    assert len(seen) == 1 + 2 + 2 + 2 + 2 + 2  # discovery; dense ONNX, its parity; compression; compressed ONNX, parity
    for kind in ("dense", "compressed"):
        parity = report["onnx"]["parity"][kind]
        assert parity["passed"] and parity["mode"].startswith("streamed") and parity["greedy"]["equal"], parity
        assert report["perplexity"][f"onnx_{kind}"] == pytest.approx(report["perplexity"][kind], rel=1e-4)
    assert report["onnx"]["rewritten_linears"] == len(report["layers"])

    from transformers import AutoTokenizer

    from exporter.onnx.fused import build_onnx
    model = load_compressed(tmp_path / "out")
    resident = build_onnx(model, AutoTokenizer.from_pretrained(model_dir), tmp_path / "resident")
    streamed, direct = (onnx.load(str(f)) for f in (tmp_path / "out" / "model.onnx", resident))
    assert [n.op_type for n in streamed.graph.node] == [n.op_type for n in direct.graph.node]
    weights = {t.name: to_array(t, base_dir=str(resident.parent)) for t in direct.graph.initializer}
    for t in streamed.graph.initializer:
        np.testing.assert_array_equal(to_array(t, base_dir=str(tmp_path / "out")), weights[t.name], err_msg=t.name)


def test_an_onnx_graph_too_big_for_this_machine_is_written_and_the_report_says_it_was_not_run(tmp_path, text,
                                                                                               monkeypatch):
    model_dir = tiny_model_dir("llama", tmp_path / "model")
    monkeypatch.setattr("exporter.load.open.available_bytes", lambda device: 1000)
    cfg = config(model_dir, tmp_path / "out", text)
    report = run(RunConfig(**{**cfg.__dict__, "formats": ("onnx",)}), progress=False, echo=lambda *_: None)
    assert set(report["onnx"]["not_checked"]) == {"dense", "compressed"}
    assert "not run" in report["onnx"]["not_checked"]["dense"] and report["onnx"]["parity"] == {}
    assert "onnx_dense" not in report["perplexity"] and (tmp_path / "out" / "model.onnx").exists()


def test_resume_after_a_kill_gives_the_same_artifacts(tmp_path, text, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM
    model_dir = tiny_model_dir("llama", tmp_path / "model")
    four_layers = AutoConfig.from_pretrained(model_dir, num_hidden_layers=4)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(four_layers).save_pretrained(model_dir)
    whole = run(config(model_dir, tmp_path / "whole", text, method="adasvd", allocation="adacr"), progress=False,
                echo=lambda *_: None)

    die_after_layer(monkeypatch, 2)
    cfg = config(model_dir, tmp_path / "out", text, method="adasvd", allocation="adacr")
    with pytest.raises(Killed):
        run(cfg, progress=False, echo=lambda *_: None, resume=True)
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(partial) == 1 and json.loads((partial[0] / ".resume" / "state.json").read_text())["next"] == 2
    monkeypatch.undo()  # the writer lives again
    materialised = []
    monkeypatch.setattr(CheckpointSource, "materialize",
                        lambda self, i, _m=CheckpointSource.materialize: materialised.append(i) or _m(self, i))
    resumed = run(cfg, progress=False, echo=lambda *_: None, resume=True)
    assert materialised == [0, 2, 3]  # discovery's forward, then layers 2-3: 0-1 were not compressed again
    assert resumed["perplexity"] == whole["perplexity"]
    assert resumed["layers"] == whole["layers"]
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_resume_with_other_settings_is_refused(tmp_path, text, monkeypatch):
    model_dir = tiny_model_dir("llama", tmp_path / "model")

    die_after_layer(monkeypatch, 1, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        run(config(model_dir, tmp_path / "out", text), progress=False, echo=lambda *_: None, resume=True)
    monkeypatch.undo()
    other = config(model_dir, tmp_path / "out", text)
    other = RunConfig(**{**vars(other), "compression": CompressionConfig(ratio=0.5, allocation="uniform")})
    with pytest.raises(ResumeError, match=r"other settings \(compression.ratio 0.4 -> 0.5\)"):
        run(other, progress=False, echo=lambda *_: None, resume=True)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]) == 1  # kept, untouched


def test_sharded_output_reloads_in_one_call(tmp_path, text, monkeypatch):
    model_dir = tiny_model_dir("opt", tmp_path / "model")
    monkeypatch.setattr("exporter.output.shards.SINGLE_FILE_LIMIT", 1)
    run(config(model_dir, tmp_path / "out", text), progress=False, echo=lambda *_: None)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{k:05d}-of-00003.safetensors" for k in (1, 2, 3)]  # the rest, layer 0, layer 1
    reloaded = load_compressed(out)
    merged = {}
    for f in files:
        merged.update(load_file(str(out / f)))
    state = reloaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in merged.items())
    ids = random_batches()[0]
    assert torch.isfinite(reloaded(input_ids=ids).logits).all()


def test_a_checkpoint_in_float16_is_written_in_float16_and_the_loss_describes_it(tmp_path, text):
    model_dir = tiny_model_dir("llama", tmp_path / "model")
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16).save_pretrained(model_dir)
    report = run(config(model_dir, tmp_path / "out", text), progress=False, echo=lambda *_: None)
    assert report["dtype"] == {"export": "float16", "compute": "float32"}
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float16}
    # the factors as stored lose a little against the exact minimum, and the report says so
    ratios = [v["loss"] / v["loss_min"] for v in report["layers"].values()]
    assert all(r >= 1 - 1e-9 for r in ratios) and max(r for r in ratios) > 1 + 1e-6


def test_missing_and_unexpected_tensors_are_refused(tmp_path):
    model_dir = tiny_model_dir("llama", tmp_path / "model")
    weights = load_file(str(model_dir / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"},
              str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no tensor for model.layers.1.mlp.up_proj.weight"):
        CheckpointSource(model_dir)
    save_file({**weights, "model.layers.0.extra.weight": torch.zeros(2)}, str(model_dir / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.0.extra.weight has no place"):
        CheckpointSource(model_dir)
    weights["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    source = CheckpointSource(model_dir)  # layer 1 is read when its turn comes
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight holds NaN"):
        source.materialize(1)


def test_checkpoint_keys_without_the_base_model_prefix(tmp_path, text):
    """Older OPT checkpoints on the hub name their tensors `decoder.…`, not `model.decoder.…`."""
    model_dir = tiny_model_dir("opt", tmp_path / "model")
    weights = load_file(str(model_dir / "model.safetensors"))
    save_file({k.removeprefix("model."): v for k, v in weights.items()}, str(model_dir / "model.safetensors"),
              metadata={"format": "pt"})
    source = CheckpointSource(model_dir)
    layer = source.materialize(0)
    torch.testing.assert_close(layer.fc1.weight, weights["model.decoder.layers.0.fc1.weight"])
    shutil.rmtree(model_dir)
