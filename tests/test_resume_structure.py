"""Resume, on a model held whole in memory (a GGUF file, or a stage that needs the whole model) and on a
streamed one: the layers compressed before the kill get their low-rank structure (and, held in memory, their
written weights) back, so what follows the layer loop (parameter counts, the ONNX graph) sees the compressed
model, not the dense layers of a fresh load."""
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from conftest import Killed, die_after_layer
from onnx.numpy_helper import to_array
from onnx_helpers import tiny_model_dir
from safetensors.torch import load_file
from test_streaming import TEXT, config

from exporter.onnx.stage import OnnxStage
from exporter.run import run


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "streamed"])
def test_resume_gives_the_same_report_and_artifacts(tmp_path, text, monkeypatch, resident):
    from transformers import AutoConfig, AutoModelForCausalLM
    model_dir = tiny_model_dir("llama", tmp_path / "model")
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir, num_hidden_layers=4)).save_pretrained(model_dir)
    if resident:
        monkeypatch.setattr("exporter.run.whole_model_reason", lambda *_: "a test holds the model whole")
    onnx_too = lambda out: dataclasses.replace(config(model_dir, out, text), formats=("safetensors", "onnx"))
    whole = run(onnx_too(tmp_path / "whole"), progress=False, echo=lambda *_: None)
    assert whole["streamed"] != resident

    dense_graphs = []  # every dense graph written: the resumed run reuses the killed run's
    build = OnnxStage._build

    def counting_build(self, model, source, folder, *rest):
        if folder.name == "dense":
            dense_graphs.append(folder)
        return build(self, model, source, folder, *rest)
    monkeypatch.setattr(OnnxStage, "_build", counting_build)
    cfg = onnx_too(tmp_path / "out")
    with monkeypatch.context() as m:
        die_after_layer(m, 1)
        with pytest.raises(Killed):
            run(cfg, progress=False, echo=lambda *_: None, resume=True)
    assert len(dense_graphs) == 1 and dense_graphs[0].parent.name == ".dense-onnx"  # inside the partial folder
    resumed = run(cfg, progress=False, echo=lambda *_: None, resume=True)
    assert len(dense_graphs) == 1 and "dense_reused" in resumed["onnx"]
    assert resumed["onnx"]["parity"] == whole["onnx"]["parity"]  # its checks come with it
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert resumed["params"] == whole["params"] and resumed["ratio"] == whole["ratio"]
    assert resumed["perplexity"] == whole["perplexity"] and resumed["layers"] == whole["layers"]
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    graphs = [onnx.load(str(tmp_path / name / "model.onnx")) for name in ("whole", "out")]
    weights = {t.name: to_array(t, base_dir=str(tmp_path / "whole")) for t in graphs[0].graph.initializer}
    assert len(weights) == len(graphs[1].graph.initializer)
    for t in graphs[1].graph.initializer:
        np.testing.assert_array_equal(to_array(t, base_dir=str(tmp_path / "out")), weights[t.name], err_msg=t.name)


def test_a_kept_dense_graph_is_reused_only_when_complete_and_written_with_the_same_onnx_settings(tmp_path):
    """The dense graph a killed --resume run kept is reused with its checks when its record says it was
    complete and written with this run's ONNX settings; a partial one, or one of other settings, is removed."""
    import json

    from exporter.onnx.stage import DENSE_RECORD
    folder = tmp_path / ".dense-onnx"

    def stage():
        return OnnxStage(tmp_path / "out", "float32", 18, True, resumable_folder=folder)

    def keep(settings):
        (folder / "dense").mkdir(parents=True)
        (folder / "dense" / "model.onnx").write_bytes(b"graph")
        report = {"graph": "fused", "parity": {"dense": {"passed": True}}}
        (folder / DENSE_RECORD).write_text(json.dumps({"settings": settings, "file": "dense/model.onnx",
                                                       "report": report}))

    same = stage()
    keep(same.dense_settings)
    assert same._reuse_dense()
    assert same.dense_path == folder / "dense" / "model.onnx" and same.report["parity"]["dense"]["passed"]
    (folder / DENSE_RECORD).unlink()  # killed while the graph was written: no record
    assert not stage()._reuse_dense() and not any(folder.iterdir())
    keep({**same.dense_settings, "opset": 17})  # written by a run with another --opset
    assert not stage()._reuse_dense() and not any(folder.iterdir())
