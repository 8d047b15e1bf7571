"""Bad input, in process (click's CliRunner): every case exits with the right code and one line
`svd-export: error: …` holding a stable fragment, leaves nothing beside --out and changes nothing that was
there before (the whole tmp folder is compared, inputs included). docs/reliability.md lists the cases."""
from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
import pytest
import torch
from bad_inputs_helpers import FAST, assert_one_error, cli, save_tiny, snapshot
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny random models on disk, shared read-only by every case (each corrupting case copies one)."""
    root = tmp_path_factory.mktemp("models")
    models = {arch: save_tiny(root / arch, arch) for arch in ("llama", "opt")}
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)  # what cannot work at all: an encoder-decoder
    T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                        d_kv=16)).save_pretrained(root / "t5")
    models["t5"] = root / "t5"
    return models


@dataclass
class Ctx:
    root: Path  # everything the case may touch; compared before/after
    saved: dict

    @property
    def out(self) -> Path:
        return self.root / "work" / "out"

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    def model_copy(self, arch: str = "llama") -> Path:
        dest = self.inputs / f"{arch}-copy"
        if not dest.exists():
            shutil.copytree(self.saved[arch], dest)
        return dest

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.inputs / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path


@dataclass
class Case:
    id: str
    args: Callable[[Ctx], list]  # --out is added unless the args name one
    fragment: str
    code: int = 1
    setup: Callable[[Ctx], None] = lambda ctx: None


def model_args(ctx: Ctx, arch: str = "llama") -> list:
    return ["-m", ctx.saved[arch], *FAST]


def corrupt_state(edit: Callable[[dict], None]) -> Callable[[Ctx], list]:
    """A copy of the tiny llama whose model.safetensors went through `edit`."""
    def args(ctx: Ctx) -> list:
        folder = ctx.model_copy()
        state = load_file(folder / "model.safetensors")
        edit(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return ["-m", folder, *FAST]
    return args


def truncated_safetensors(ctx: Ctx) -> list:
    folder = ctx.model_copy()
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    return ["-m", folder, *FAST]


def garbage_safetensors(ctx: Ctx) -> list:
    folder = ctx.model_copy()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 20) + b"{not json at all....")
    return ["-m", folder, *FAST]


def index_with_missing_shard(ctx: Ctx) -> list:
    folder = ctx.model_copy()
    names = list(load_file(folder / "model.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00002-of-00002.safetensors" for n in names}}))
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    return ["-m", folder, *FAST]


def tiny_gguf(ctx: Ctx, cut: int = 0, magic: bytes = b"GGUF") -> list:
    import gguf
    path = ctx.inputs / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_tensor("token_embd.weight", torch.ones(128, 64).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.write_bytes(magic + data[4:len(data) - cut])
    return ["-m", path, *FAST]


def no_config(ctx: Ctx) -> list:
    folder = ctx.model_copy()
    (folder / "config.json").unlink()
    return ["-m", folder, *FAST]


def fill_out(ctx: Ctx) -> None:
    ctx.out.mkdir()
    (ctx.out / "keep.txt").write_text("mine")


def out_as_file(ctx: Ctx) -> None:
    ctx.out.write_text("a file")


def text(n_chars: int) -> str:
    return ("The quick brown fox jumps over the lazy dog. " * (n_chars // 45 + 1))[:n_chars]


CASES = [
    # --- the output folder
    Case("out-not-empty", lambda c: model_args(c), "exists and is not empty (use --overwrite)", setup=fill_out),
    Case("out-is-a-file", lambda c: model_args(c), "exists and is a file", setup=out_as_file),
    Case("out-dot", lambda c: [*model_args(c), "-o", "."], "must name a new folder"),
    Case("out-dotdot", lambda c: [*model_args(c), "-o", ".."], "must name a new folder"),
    Case("out-root", lambda c: [*model_args(c), "-o", "/"], "must name a new folder"),
    Case("out-trailing-dot", lambda c: [*model_args(c), "-o", f"{c.root}/work/."], "must name a new folder"),
    Case("out-under-a-file", lambda c: [*model_args(c), "-o", c.out / "sub"], "cannot write beside --out",
         setup=out_as_file),
    Case("out-inside-model", lambda c: ["-m", c.model_copy(), *FAST, "-o", c.model_copy() / "out"],
         "overlaps the input model folder"),
    Case("out-is-model-overwrite", lambda c: ["-m", c.model_copy(), *FAST, "-o", c.model_copy(), "--overwrite"],
         "overlaps the input model folder"),
    Case("out-contains-model-overwrite", lambda c: ["-m", c.model_copy(), *FAST, "-o", c.inputs, "--overwrite"],
         "overlaps the input model folder"),
    # --- ratio and budget: never a silent lossy result
    Case("ratio-zero", lambda c: [*model_args(c), "--ratio", "0"], "--ratio 0 removes nothing"),
    Case("ratio-one", lambda c: [*model_args(c), "--ratio", "1"], "--ratio must be in [0, 1)"),
    Case("ratio-negative", lambda c: [*model_args(c), "--ratio", "-0.1"], "--ratio must be in [0, 1)"),
    Case("ratio-and-budget", lambda c: [*model_args(c), "--ratio", "0.3", "--budget", "1MB"],
         "either --ratio or --budget"),
    Case("budget-unparsable", lambda c: [*model_args(c), "--budget", "lots"], "--budget 'lots'"),
    Case("budget-already-met", lambda c: [*model_args(c), "--budget", "1TB"], "already fit, there is nothing to compress"),
    Case("budget-below-dense-parts", lambda c: [*model_args(c), "--budget", "1000"], "embeddings, lm_head"),
    # --- options that do not apply, or do not fit together
    Case("min-retention-without-adacr", lambda c: [*model_args(c), "--method", "svd", "--min-retention", "0.3"],
         "--min-retention is adaCR's"),
    Case("min-retention-zero", lambda c: [*model_args(c), "--allocation", "adacr", "--min-retention", "0"],
         "--min-retention must be in (0, 1]"),
    Case("opset-without-onnx", lambda c: [*model_args(c), "--opset", "19"], "--opset only applies with --format onnx"),
    Case("skip-parity-without-onnx", lambda c: [*model_args(c), "--skip-parity"],
         "--skip-parity only applies with --format onnx"),
    Case("adacomp-strength-without-adasvd", lambda c: [*model_args(c), "--method", "svd-llm-v2",
                                                        "--adacomp-strength", "0.5"],
         "--adacomp-strength only applies with --method adasvd"),
    Case("refine-steps-without-refine", lambda c: [*model_args(c), "--method", "svd-llm-v2", "--refine-steps", "8"],
         "--refine-steps only applies with --refine block or e2e"),
    Case("e2e-samples-without-e2e", lambda c: [*model_args(c), "--method", "svd", "--e2e-samples", "64"],
         "set the data of end-to-end refinement: add --refine e2e or block+e2e"),
    Case("e2e-parallel-one-process", lambda c: [*model_args(c), "--refine", "block+e2e", "--e2e-parallel", "fsdp"],
         "--e2e-parallel fsdp says how the processes of torchrun share end-to-end refinement"),
    Case("e2e-data-missing", lambda c: [*model_args(c), "--refine", "block+e2e", "--e2e-data", "/nonexistent.txt"],
         "--e2e-data: data file not found"),
    Case("e2e-one-batch", lambda c: [*model_args(c), "--refine", "block+e2e", "--e2e-samples", "2",
                                     "--calib-batch-size", "2", "--calib-samples", "4"],
         "holds out end-to-end batches for early stopping and needs at least 2"),
    Case("refine-propagate-original", lambda c: [*model_args(c), "--refine", "block", "--propagate", "original"],
         "cannot run with --propagate original"),
    Case("refine-one-calibration-batch", lambda c: [*model_args(c), "--method", "svd-llm-v2", "--refine", "block",
                                                    "--calib-samples", "2", "--calib-batch-size", "2"],
         "needs at least 2"),
    Case("adacomp-iterations-without-adasvd", lambda c: [*model_args(c), "--method", "svd-llm",
                                                          "--adacomp-iterations", "2"],
         "--adacomp-iterations only applies with --method adasvd"),
    Case("eval-tokens-without-eval", lambda c: [*model_args(c), "--eval-tokens", "100"],
         "--eval-tokens only applies with an --eval-data"),
    Case("calib-overlap-with-generated", lambda c: [*model_args(c), "--calib-overlap"],
         "--calib-overlap only applies"),
    Case("adasvd-propagate-original", lambda c: [*model_args(c), "--method", "adasvd", "--propagate", "original",
                                                 "--allocation", "uniform"], "needs --propagate compressed"),
    Case("throughput-without-onnx", lambda c: [*model_args(c), "--validate", "throughput"], "add --format onnx"),
    Case("opset-too-old", lambda c: [*model_args(c), "--format", "onnx", "--opset", "17"], "needs opset >= 18"),
    Case("opset-beyond-onnxruntime", lambda c: [*model_args(c), "--format", "onnx", "--opset", "99"],
         "does not support it"),
    Case("eval-seqlen-one", lambda c: [*model_args(c), "--eval-seqlen", "1"], "--eval-seqlen", code=2),
    Case("device-not-a-device", lambda c: [*model_args(c), "--device", "gpu7"], "is not a device"),
    # --- usage errors: one line too, click's exit code 2
    Case("unknown-option", lambda c: [*model_args(c), "--ratoi", "0.3"], "No such option '--ratoi'", code=2),
    Case("calib-samples-zero", lambda c: [*model_args(c), "--calib-samples", "0"], "Invalid value for '--calib-samples'",
         code=2),
    Case("unknown-method", lambda c: [*model_args(c), "--method", "pca"], "Invalid value for '--method'", code=2),
    Case("ratio-not-a-number", lambda c: [*model_args(c), "--ratio", "abc"], "Invalid value for '--ratio'", code=2),
    # --- calibration / evaluation data
    Case("calib-file-missing", lambda c: [*model_args(c), "--calib-data", c.inputs / "nope.txt"],
         "--calib-data: data file not found"),
    Case("calib-file-binary", lambda c: [*model_args(c), "--calib-data", c.file("x.txt", bytes(range(256)) * 4)],
         "is not UTF-8 text (byte 0x80 at offset 128)"),
    Case("calib-file-empty", lambda c: [*model_args(c), "--calib-data", c.file("e.txt", "")], "is empty"),
    Case("calib-file-is-folder", lambda c: [*model_args(c), "--calib-data", c.inputs], "is a folder"),
    Case("calib-jsonl-without-text", lambda c: [*model_args(c), "--calib-data", c.file("d.jsonl", '{"body": "x"}\n')],
         'd.jsonl:1: each JSONL line needs a "text" field'),
    Case("eval-file-missing", lambda c: [*model_args(c), "--eval-data", c.inputs / "nope.raw"],
         "--eval-data: data file not found"),
    Case("calib-fewer-tokens-than-asked", lambda c: ["-m", c.saved["llama"], "--calib-data", c.file("s.txt", text(500)),
                                                     "--calib-samples", "16", "--calib-seqlen", "64",
                                                     "--eval-data", "none", "--allocation", "uniform", "-q"],
         "has 500 tokens, fewer than --calib-samples 16 x --calib-seqlen 64 = 1024"),
    Case("calib-shorter-than-seqlen", lambda c: ["-m", c.saved["llama"], "--calib-data", c.file("s.txt", text(40)),
                                                 "--calib-seqlen", "64", "--eval-data", "none", "-q"],
         "fewer than --calib-seqlen 64"),
    Case("calib-seqlen-beyond-positions-llama", lambda c: [*model_args(c), "--calib-seqlen", "300"],
         "--calib-seqlen 300 exceeds the model's 256 positions"),
    Case("calib-seqlen-beyond-positions-opt", lambda c: [*model_args(c, "opt"), "--calib-seqlen", "300"],
         "--calib-seqlen 300 exceeds the model's 256 positions"),
    # --- the model
    Case("model-dir-missing", lambda c: ["-m", c.inputs / "no-such-model", *FAST], "no such model folder"),
    Case("model-relative-dir-missing", lambda c: ["-m", "./no-such-model/", *FAST], "no such model folder"),
    Case("model-gguf-missing", lambda c: ["-m", c.inputs / "m.gguf", *FAST], "GGUF file not found"),
    Case("model-plain-file", lambda c: ["-m", c.file("weights.bin", "x"), *FAST], "a file that is not .gguf"),
    Case("model-without-config", no_config, "has no config.json"),
    Case("model-encoder-decoder", lambda c: ["-m", c.saved["t5"], *FAST],
         "architecture 't5' is an encoder-decoder; only decoder-only causal LMs are supported"),
    Case("model-hub-id-offline", lambda c: ["-m", "nobody-xyz/not-a-model-123", *FAST],
         "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
    # --- incomplete or corrupt checkpoints
    Case("safetensors-truncated", truncated_safetensors, "model.safetensors: truncated"),
    Case("safetensors-garbage-header", garbage_safetensors, "model.safetensors: corrupt safetensors header"),
    Case("safetensors-index-missing-shard", index_with_missing_shard,
         "model-00002-of-00002.safetensors: file not found"),
    Case("checkpoint-missing-tensor", corrupt_state(lambda s: s.pop("model.layers.1.mlp.down_proj.weight")),
         "is missing tensor model.layers.1.mlp.down_proj.weight"),
    Case("checkpoint-unexpected-tensor", corrupt_state(lambda s: s.update({"model.layers.9.extra.weight": torch.ones(2)})),
         "has an unexpected tensor model.layers.9.extra.weight"),
    Case("checkpoint-nan-weight", corrupt_state(lambda s: s["model.layers.0.self_attn.q_proj.weight"].__setitem__(
        (0, 0), float("nan"))), "tensor model.layers.0.self_attn.q_proj.weight has 1 non-finite value"),
    Case("checkpoint-inf-weight", corrupt_state(lambda s: s["model.norm.weight"].__setitem__(3, float("inf"))),
         "tensor model.norm.weight has 1 non-finite value"),
    Case("gguf-truncated", lambda c: tiny_gguf(c, cut=4000), "tiny.gguf: truncated GGUF file"),
    Case("gguf-bad-magic", lambda c: tiny_gguf(c, magic=b"GGML"), "tiny.gguf: not a GGUF file"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case: Case, saved, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    ctx = Ctx(tmp_path, saved)
    ctx.inputs.mkdir()
    (tmp_path / "work").mkdir()
    case.setup(ctx)
    args = [str(a) for a in case.args(ctx)]
    if "-o" not in args:
        args += ["-o", str(ctx.out)]
    before = snapshot(tmp_path)
    code, output = cli(args)
    assert code == case.code, output
    assert_one_error(output, case.fragment)
    assert snapshot(tmp_path) == before


def test_every_option_has_a_description():
    from exporter.cli import main
    undocumented = [p.name for p in main.params if isinstance(p, click.Option) and not p.help]
    assert undocumented == []
