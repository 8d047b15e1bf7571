"""Our artifacts against onnxruntime-genai's model builder on SmolLM2-135M: one evaluation loop for every
graph (perplexity on two texts, disk size, weight bytes one decoded token reads, ONNX Runtime CPU decode
speed), so the two sides are compared on the same numbers.

    OMP_NUM_THREADS=1 python -m benchmarks.quality.front                      # the builder's rows
    OMP_NUM_THREADS=1 python -m benchmarks.quality.front --ours svd-0.2-int4=build/front/ours-0.2-int4
    OMP_NUM_THREADS=1 python -m benchmarks.quality.front --run-ours --ratios 0.2 0.4 --quantize none int4

Rows. A builder row is `python -m onnxruntime_genai.models.builder -i build/front/hf -o build/front/builder-<row>
-p <precision> -e cpu -c build/front/cache [--extra_options ...]` on a Hugging Face folder of SmolLM2-135M that
this script writes once (build/front/hf, from benchmarks.common.smollm2()); each output folder is a cache
(skipped when its model.onnx exists; the build's wall seconds are kept beside it in front-build.json). `--ours
LABEL=FOLDER` adds an svd-export output folder (model.onnx + external data + report.json); `--run-ours` makes
them with the CLI (build/front/ours-<ratio>-<quantize>, cached the same way), calibrated on the calibration
part of wiki.valid.tokens only (its first 75% of tokens, exporter/data/splits.py, written to
build/front/calib-part.txt), so that the validation text below is held out for them too.

Evaluation, identical for every row: an ONNX Runtime CPU session with 1 intra-op thread; perplexity is the
prefill-only forward of each non-overlapping window of 512 tokens with an empty past, logits -> summed
next-token NLL (exporter.validate.perplexity) -> exp(mean). Two texts, tokenized once with the SmolLM2 tokenizer
(the builder copies the same tokenizer): `test` = the first 4096 tokens of wiki.test.raw, `validation` = the
first 4096 tokens of the validation part of wiki.valid.tokens. Decode speed: the first 64 test tokens as the
prompt (one prefill), then 64 greedy steps on the KV cache (the present of a step is the past of the next;
plain session.run, no IO binding), a warm-up then the median of 3. Weight bytes per decoded token: the
initializers of model.onnx as stored (read without their data): a table read only by row lookups (Gather,
GatherBlockQuantized - also through a Reshape/Cast/Identity -, the rotary caches of RotaryEmbedding and
GroupQueryAttention) counts one row; everything else in full, once, however many nodes read it. Packed 4-bit
weights in uint8 tensors (MatMulNBits' B, GatherBlockQuantized's data) count their stored bytes, two weights a
byte; tensors of ONNX's own 4-bit/2-bit types count bits/8 bytes per element. Constant nodes are not counted.

What this builder (onnxruntime-genai 0.18.0, builder.py / builders/base.py / quantization/quant_config.py) does
with SmolLM2 (tie_word_embeddings=true) on `-e cpu`, read in its source and checked on the graphs it wrote:
- `shared_embeddings` defaults to the model's tie_word_embeddings, so the embedding and lm_head share one table:
  fp32: the lm_head's MatMul weight, read by the embedding through Transpose + Gather; int4: 'Gather' is added to
  op_types_to_quantize and the embedding is GatherBlockQuantized (bits 4, block 32, gather_axis 0, quantize_axis 1)
  on the lm_head's own 4-bit MatMulNBits weight (Reshape to [vocab, hidden/2] uint8) and its scales: lm_head and
  embedding are both 4-bit; int8: GatherBlockQuantized supports 4 bits only, so the table is not shared: a
  separate float32 embedding (Gather) and an 8-bit lm_head.
- int4/int8 weights: MatMulNBits, block_size 32, symmetric (no zero points), scales float32 (the io dtype on CPU),
  algorithm `default` = ORT's MatMulNBitsQuantizer with no algo config, i.e. round-to-nearest (RTN); `algo_config`
  may be rtn / k_quant (k_quant writes zero points) and `rtn_last`/`k_quant_last` put the lm_head at 8 bits.
  Every MatMul is quantized (151 MatMulNBits: qkv fused, o, gate, up, down per layer, and the lm_head).
- accuracy level: the option is `accuracy_level`, default 4 (int8 activations) on the CPU and WebGPU EPs, 0
  elsewhere. The help text says the old `int4_`-prefixed names still work, but no code maps them in 0.18.0:
  `--extra_options int4_accuracy_level=1` builds a graph byte-identical to the default's (the row
  builder-int4-legacy-acc1 shows it). The accuracy-level row is therefore `accuracy_level=1` (float32
  activations); level 4 is the int4 row itself.
- `default` and `rtn` are not the same rounding: `default` stores signed scales (the block's largest magnitude
  maps to code -8, all 16 levels used), `rtn` |scale| = absmax / 7.5 (15 levels): rtn_last's body is coarser.
- the builder takes any nn.Linear with vocab_size outputs for the lm_head (builders/base.py has_lm_head): a
  model whose MLP width equals its vocabulary (tests' tiny Llama: 128 and 128) gets a wrong graph.
- graph IO: input_ids, attention_mask, past_key_values.N.key/value (no position_ids: GroupQueryAttention does the
  rotary from the mask's lengths); logits, present.N.key/value; KV float32 [batch, 3, past, kv_cache_dim] with a
  symbolic head size (64 from genai_config.json).
- the GGUF-derived config (exporter's smollm2-135m) needs no fix: architectures LlamaForCausalLM, rope_theta only
  inside rope_parameters (the builder lifts rope_parameters to the top level before it reads rope_theta),
  rms_norm_eps 9.999999747e-06 (1e-5 rounded to float32 by GGUF: kept, it is what the PyTorch model runs).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, ROOT, WIKITEXT, command_line, smollm2
from exporter.validate.ort_session import OrtDecoder, create_session
from exporter.validate.perplexity import eval_windows, nll_sum, torch_logits

BUILD = ROOT / "build" / "front"
HF, CACHE = BUILD / "hf", BUILD / "cache"
DOC = "front"
BUILT = "front-build.json"  # beside a cached artifact: how and in how many seconds it was made
BUILDER = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
# row -> (precision, extra options, what it is)
BUILDER_ROWS = {
    "builder-fp32": ("fp32", [], "builder -p fp32: float32; embedding = the tied lm_head weight (Transpose+Gather)"),
    "builder-int4": ("int4", [], ("builder -p int4 defaults: RTN sym. 4-bit, block 32, acc. level 4; lm_head 4-bit, "
                     "embedding = that table (GatherBlockQuantized)")),
    "builder-int8": ("int8", [], ("builder -p int8: RTN sym. 8-bit, block 32, acc. level 4; lm_head 8-bit, "
                     "separate float32 embedding")),
    "builder-int4-acc1": ("int4", ["accuracy_level=1"], ("as builder-int4 with accuracy_level=1 (float32 "
                          "activations in MatMulNBits)")),
    "builder-int4-legacy-acc1": ("int4", ["int4_accuracy_level=1"], ("as builder-int4 with int4_accuracy_level=1, "
                                 "the old option name the help text still lists")),
    "builder-int4-kquant": ("int4", ["algo_config=k_quant"], ("as builder-int4 with algo_config=k_quant "
                            "(k-quant rounding, zero points)")),
    "builder-int4-rtn-last": ("int4", ["algo_config=rtn_last"], ("as builder-int4 with algo_config=rtn_last: "
                              "lm_head and its shared embedding 8-bit")),
}
REFERENCE_ROW = "builder-int4"
WINDOW, TOKENS, PROMPT, STEPS, REPEATS = 512, 4096, 64, 64, 3


def relative(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ---------------------------------------------------------------- artifacts


def hf_folder(model, tokenizer) -> Path:
    """SmolLM2-135M as a Hugging Face folder the builder reads (made once). The config needs no fix (see the
    module docstring); what the builder relies on is checked here instead of assumed."""
    if not (HF / "model.safetensors").exists():
        model.save_pretrained(HF, safe_serialization=True)
        tokenizer.save_pretrained(HF)
    config = json.loads((HF / "config.json").read_text())
    if config.get("architectures") != ["LlamaForCausalLM"] or not config.get("tie_word_embeddings"):
        raise RuntimeError(f"{HF}/config.json: expected a tied LlamaForCausalLM, got {config.get('architectures')}")
    return HF


def build_record(folder: Path) -> dict:
    path = Path(folder) / BUILT
    return json.loads(path.read_text()) if path.exists() else {}


def run_logged(argv: list[str], folder: Path, shown: str, log_name: str) -> dict:
    """Run a build command (cwd: the repository; its output in logs/ beside the folder, build/front/logs for
    this script's) unless folder/model.onnx exists. -> its record: the command as quoted in the results and its
    wall seconds (kept beside the artifact)."""
    if (Path(folder) / "model.onnx").exists():
        return build_record(folder)
    logs = Path(folder).parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{log_name}.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(argv, check=False, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or not (Path(folder) / "model.onnx").exists():
        raise RuntimeError(f"{shown} failed (exit {done.returncode}); see {relative(log)}")
    record = {"command": shown, "wall_s": seconds, "log": relative(log)}
    (Path(folder) / BUILT).write_text(json.dumps(record, indent=1))
    return record


def builder_argv(hf: Path, out: Path, precision: str, extra: list[str], cache: Path) -> list[str]:
    argv = ["-i", relative(hf), "-o", relative(out), "-p", precision, "-e", "cpu", "-c", relative(cache)]
    return argv + (["--extra_options", *extra] if extra else [])


def run_builder(hf: Path, out: Path, precision: str, extra: list[str], cache: Path = CACHE) -> dict:
    """One builder run (cached by its output folder). -> {"command", "wall_s", "log"}."""
    argv = builder_argv(hf, out, precision, extra, cache)
    shown = "python -m onnxruntime_genai.models.builder " + shlex.join(argv)
    return run_logged(BUILDER + argv, out, shown, Path(out).name)


def calibration_part_file(tokenizer) -> Path:
    """The calibration part of wiki.valid.tokens as a text file (its tokens decoded), so that the CLI's
    calibration windows never cover the validation text."""
    from exporter.data.splits import split_tokens
    from exporter.data.text import read_text, tokenize
    path = BUILD / "calib-part.txt"
    if not path.exists():
        part, _ = split_tokens(tokenize(tokenizer, read_text(str(WIKITEXT / "wiki.valid.tokens"), "train")))
        BUILD.mkdir(parents=True, exist_ok=True)
        path.write_text(tokenizer.decode(part.tolist()), encoding="utf-8")
    return path


def ours_argv(ratio: float, quantize: str, out: Path, calib: Path, a) -> list[str]:
    argv = ["--model", "smollm2-135m", "--ratio", str(ratio), "--format", "onnx", "--out", relative(out),
            "--calib-data", relative(calib), "--calib-samples", "16", "--calib-seqlen", "256",
            # its own evaluation kept short: two windows of wiki.test.raw (this script measures the rest)
            "--eval-data", relative(WIKITEXT / "wiki.test.raw"), "--eval-tokens", "1024", "--eval-seqlen", "512",
            "--quiet"]
    if quantize != "none":
        argv += ["--quantize", quantize]
    if a.method:
        argv += ["--method", a.method]
    return argv + (["--skip-parity"] if a.skip_parity else []) + shlex.split(a.ours_options)


def run_ours(tokenizer, a) -> dict[str, Path]:
    """--run-ours: one svd-export run per ratio x quantization (cached by folder). -> {label: folder}."""
    calib = calibration_part_file(tokenizer)
    rows = {}
    for ratio in a.ratios:
        for quantize in a.quantize:
            out = BUILD / f"ours-{ratio}-{quantize}"
            argv = ours_argv(ratio, quantize, out, calib, a)
            record = run_logged(["svd-export", *argv], out, "svd-export " + shlex.join(argv), out.name)
            print(f"{out.name}: made in {record.get('wall_s', float('nan')):.0f} s", flush=True)
            rows[f"ours-{ratio}-{quantize}"] = out
    return rows


# ---------------------------------------------------------------- what a graph is


def onnx_file(folder: Path) -> Path:
    for candidate in (Path(folder) / "model.onnx", Path(folder) / "onnx" / "model.onnx"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no model.onnx in {folder}")


def disk_bytes(onnx_path: Path) -> int:
    """model.onnx plus the external data files its initializers name."""
    import onnx
    model = onnx.load(str(onnx_path), load_external_data=False)
    files = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    return onnx_path.stat().st_size + sum((onnx_path.parent / f).stat().st_size for f in files)


# Row lookups: (op type, input index) that read one row of a table per token.
ROW_READS = {("Gather", 0), ("GatherBlockQuantized", 0), ("GatherBlockQuantized", 2), ("GatherBlockQuantized", 3),
             ("RotaryEmbedding", 2), ("RotaryEmbedding", 3), ("GroupQueryAttention", 7),
             ("GroupQueryAttention", 8)}
VIEWS = {"Reshape", "Cast", "Identity"}  # their output keeps the rows of their input 0


def element_bits(data_type: int) -> int:
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype
    small = {getattr(onnx.TensorProto, name): bits for name, bits in
             (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2)) if hasattr(onnx.TensorProto, name)}
    return small.get(data_type) or 8 * np.dtype(tensor_dtype_to_np_dtype(data_type)).itemsize


def tensor_uses(graph) -> dict[str, set]:
    """{initializer: its readers' (op, input index)}, seen through VIEWS: a Reshape of a table that feeds a
    GatherBlockQuantized is that lookup's use of the table (the Reshape's shape input is the Reshape's use)."""
    readers: dict[str, list] = {}
    for k, node in enumerate(graph.node):
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((k, index))

    def resolve(name: str, depth: int = 0) -> set:
        found = set()
        for k, index in readers.get(name, ()):
            node = graph.node[k]
            if node.op_type in VIEWS and index == 0 and depth < 8:
                found |= resolve(node.output[0], depth + 1)
            else:
                found.add((node.op_type, index))
        return found

    return {tensor.name: resolve(tensor.name) for tensor in graph.initializer}


def decode_weight_bytes(onnx_path: Path) -> int:
    """Bytes of initializers one decoded token reads (module docstring: rows, packed weights)."""
    import onnx
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    uses = tensor_uses(graph)
    total = 0
    for tensor in graph.initializer:
        if not uses[tensor.name]:
            continue
        dims = [int(d) for d in tensor.dims]
        nbytes = math.ceil(int(np.prod(dims, dtype=np.int64)) * element_bits(tensor.data_type) / 8)
        rows_only = bool(dims) and uses[tensor.name] <= ROW_READS
        total += nbytes // dims[0] if rows_only else nbytes
    return total


def graph_facts(onnx_path: Path) -> dict:
    """What the file says about itself: matmul kinds, MatMulNBits settings, the embedding lookup, the IO."""
    import onnx
    from onnx.helper import get_attribute_value
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph, counts, settings = model.graph, {}, set()
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.op_type == "MatMulNBits":
            attrs = {a.name: get_attribute_value(a) for a in node.attribute}
            settings.add((attrs.get("bits", 4), attrs.get("block_size"), attrs.get("accuracy_level", 0),
                          len(node.input) > 3 and bool(node.input[3])))
    inputs = {i.name: i for i in graph.input}
    key = inputs.get("past_key_values.0.key")
    return {"matmul": counts.get("MatMul", 0), "gemm": counts.get("Gemm", 0), "matmulnbits": counts.get("MatMulNBits", 0),
            "nbits_settings": [dict(zip(("bits", "block_size", "accuracy_level", "zero_points"), s))
                               for s in sorted(settings)],
            "embedding_op": "GatherBlockQuantized" if counts.get("GatherBlockQuantized") else "Gather",
            "position_ids": "position_ids" in inputs,
            "kv_type": onnx.TensorProto.DataType.Name(key.type.tensor_type.elem_type) if key else None,
            "kv_shape": [d.dim_param or d.dim_value for d in key.type.tensor_type.shape.dim] if key else None}


def content_hash(onnx_path: Path) -> str:
    """sha256 of model.onnx and its data files: two rows with one hash are one graph."""
    digest = hashlib.sha256()
    for path in sorted(p for p in onnx_path.parent.iterdir() if p.name.startswith("model.onnx")):
        with open(path, "rb") as f:
            while chunk := f.read(2**24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- the evaluation loop


class Decoder(OrtDecoder):
    """OrtDecoder for both conventions: ours (position_ids, static KV dims) and the builder's (no position_ids,
    a symbolic head size `kv_cache_dim`, taken from genai_config.json / config.json instead)."""

    def __init__(self, session, folder: Path):
        super().__init__(session)
        if not (isinstance(self.kv_heads, int) and isinstance(self.head_size, int)):
            self.kv_heads, self.head_size = config_kv_dims(folder)


def config_kv_dims(folder: Path) -> tuple[int, int]:
    genai = Path(folder) / "genai_config.json"
    if genai.exists():
        decoder = json.loads(genai.read_text())["model"]["decoder"]
        return int(decoder["num_key_value_heads"]), int(decoder["head_size"])
    config = json.loads((Path(folder) / "config.json").read_text())
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return int(heads), int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def open_decoder(folder: Path, threads: int = 1) -> Decoder:
    path = onnx_file(folder)
    return Decoder(create_session(path, providers=["CPUExecutionProvider"], threads=threads), path.parent)


def perplexity_of(decoder: Decoder, tokens: torch.Tensor, window: int = WINDOW) -> dict:
    """Prefill-only forward of each window (empty past) -> summed next-token NLL -> perplexity."""
    nll, count = nll_sum(decoder.logits_fn(), eval_windows(tokens, window), progress=False)
    return {"ppl": math.exp(nll / count), "nll_sum": nll, "predicted_tokens": count}


def greedy_once(decoder: Decoder, prompt: np.ndarray, steps: int) -> tuple[float, float, list[int]]:
    """One prefill of `prompt` [1, P] then `steps` greedy decode steps. -> (prefill s, decode s, tokens)."""
    start = time.perf_counter()
    logits, past = decoder.prefill(prompt)
    prefilled = time.perf_counter()
    token = logits[:, -1].argmax(-1)[:, None]
    tokens, length = [int(token[0, 0])], prompt.shape[1]
    for _ in range(steps):
        length += 1
        logits, past = decoder(token, np.ones((1, length), dtype=np.int64), past)
        token = logits[:, -1].argmax(-1)[:, None]
        tokens.append(int(token[0, 0]))
    return prefilled - start, time.perf_counter() - prefilled, tokens


def decode_speed(decoder: Decoder, prompt: torch.Tensor, steps: int = STEPS, repeats: int = REPEATS) -> dict:
    ids = prompt.reshape(1, -1).numpy().astype(np.int64)
    greedy_once(decoder, ids, steps)  # warm-up
    runs = [greedy_once(decoder, ids, steps) for _ in range(repeats)]
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    return {"prefill_tokens_s": ids.shape[1] / prefill_s, "decode_tokens_s": steps / decode_s,
            "decode_s_runs": [r[1] for r in runs], "greedy_tokens": runs[0][2]}


def measure(label: str, kind: str, folder: Path, texts: dict, description: str, built: dict) -> dict:
    path = onnx_file(folder)
    decoder = open_decoder(folder)
    load_before = os.getloadavg()[0]
    row = {"row": label, "kind": kind, "folder": relative(folder), "what": description,
           "command": built.get("command"), "build_wall_s": built.get("wall_s"),
           "disk_bytes": disk_bytes(path), "bytes_per_token": decode_weight_bytes(path),
           "graph": graph_facts(path), "sha256_16": content_hash(path)}
    row["perplexity"] = {name: perplexity_of(decoder, tokens) for name, tokens in texts.items()}
    row["speed"] = decode_speed(decoder, texts["test"][:PROMPT])
    row["load_avg"] = [load_before, os.getloadavg()[0]]
    row["measured_utc"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    del decoder
    return row


# ---------------------------------------------------------------- rows and texts


def ours_description(folder: Path) -> str:
    report_path = Path(folder) / "report.json"
    if not report_path.exists():
        return "svd-export artifact (no report.json)"
    report = json.loads(report_path.read_text())
    ratio = report.get("ratio") or {}
    quantize = (report.get("onnx") or {}).get("quantize")
    details = report.get("method_details") or {}
    grid = details.get("quantize_grid")
    rounding = ("GPTQ" + (" + scale search" if len(grid.get("scale_search", [1.0])) > 1 else "") if grid
                else "GPTQ (ORT's scale rule)" if details.get("quantize") else "round-to-nearest")
    weights = (f"{quantize['bits']}-bit b{quantize['block_size']} {rounding}, acc. {quantize['accuracy_level']}, "
               f"lm_head {quantize['lm_head_bits']}-bit") if quantize else (report.get("dtype") or {}).get("export", "")
    corrections = details.get("corrections") or {}
    if corrections:
        weights += f", rank-{max(corrections.values())} float correction beside {len(corrections)} linears"
    calib = ((report.get("config") or {}).get("calibration") or {}).get("source", "?")
    compression = ("no low rank (ratio 0)" if not report.get("layers") else
                   f"{report.get('method')}/{report.get('allocation')} ratio {ratio.get('requested')} "
                   f"(realised {ratio.get('realized_model', float('nan')):.3f} of the model)")
    return f"svd-export {compression}, {weights}; calibrated on {Path(str(calib)).name}"


def texts_of(tokenizer, count: int = TOKENS) -> dict[str, torch.Tensor]:
    from exporter.data.splits import validation_tokens
    from exporter.data.text import read_text, tokenize
    valid = tokenize(tokenizer, read_text(str(WIKITEXT / "wiki.valid.tokens"), "train"))
    test = tokenize(tokenizer, read_text(str(WIKITEXT / "wiki.test.raw"), "test"))
    return {"validation": validation_tokens(valid, count), "test": test[:count]}


def parse_ours(specs: list[str]) -> dict[str, Path]:
    rows = {}
    for spec in specs:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            raise SystemExit(f"--ours takes LABEL=FOLDER, got {spec!r}")
        rows[label] = Path(folder)
    return rows


# ---------------------------------------------------------------- results


def machine() -> dict:
    import platform

    import onnxruntime
    import onnxruntime_genai
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cpus": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
            "onnxruntime_genai": onnxruntime_genai.__version__, "ort_threads": 1,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "date_utc": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                              time.gmtime())}


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main_table(rows: list[dict]) -> list[str]:
    reference = next((r for r in rows if r["row"] == REFERENCE_ROW), None)
    ref_ppl = reference["perplexity"]["test"]["ppl"] if reference else None
    lines = [(f"| row | what it is | disk MB | bytes/token MB | validation ppl | test ppl | ppl / {REFERENCE_ROW} (test) "
             "| decode tok/s |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        test = r["perplexity"]["test"]["ppl"]
        lines.append(f"| `{r['row']}` | {r['what']} | {r['disk_bytes'] / 1e6:.1f} | {r['bytes_per_token'] / 1e6:.1f} | "
                     f"{r['perplexity']['validation']['ppl']:.2f} | {test:.2f} | "
                     f"{fmt(test / ref_ppl if ref_ppl else None, 3)} | {r['speed']['decode_tokens_s']:.1f} |")
    return lines


def facts_table(rows: list[dict]) -> list[str]:
    lines = [("| row | MatMul / Gemm / MatMulNBits | MatMulNBits (bits, block, acc. level, zero points) | embedding | "
             "position_ids | KV | prefill tok/s | build s | same files as |"), "|---|---|---|---|---|---|---|---|---|"]
    seen: dict[str, str] = {}
    for r in rows:
        g = r["graph"]
        nbits = ", ".join(f"({s['bits']}, {s['block_size']}, {s['accuracy_level']}, {'yes' if s['zero_points'] else 'no'})"
                          for s in g["nbits_settings"]) or "-"
        kv = f"{g['kv_type']} {g['kv_shape']}".replace("'", "")
        same = seen.setdefault(r["sha256_16"], r["row"])
        lines.append(f"| `{r['row']}` | {g['matmul']} / {g['gemm']} / {g['matmulnbits']} | {nbits} | {g['embedding_op']} | "
                     f"{'yes' if g['position_ids'] else 'no'} | {kv} | {r['speed']['prefill_tokens_s']:.0f} | "
                     f"{fmt(r['build_wall_s'], 1)} | {'' if same == r['row'] else f'`{same}`'} |")
    return lines


GOAL_PPL = 1.10  # the goal: smaller on disk than REFERENCE_ROW with perplexity at most this many times its


def goal_lines(rows: list[dict]) -> list[str]:
    """Which of our rows are smaller on disk than the reference row with perplexity ≤ GOAL_PPL × its, on the
    validation text (where a choice may be made) and on the test text (reported)."""
    reference = next((r for r in rows if r["row"] == REFERENCE_ROW), None)
    if reference is None:
        return []
    lines = [f"Goal: smaller on disk than `{REFERENCE_ROW}` ({reference['disk_bytes'] / 1e6:.1f} MB) with perplexity "
             f"at most {GOAL_PPL:.2f}× its."]
    for text in ("validation", "test"):
        bound = GOAL_PPL * reference["perplexity"][text]["ppl"]
        met = [r for r in rows if r["kind"] == "ours" and r["disk_bytes"] < reference["disk_bytes"]
               and r["perplexity"][text]["ppl"] <= bound]
        names = ", ".join(f"`{r['row']}` ({r['disk_bytes'] / 1e6:.1f} MB, {r['perplexity'][text]['ppl']:.2f})"
                          for r in sorted(met, key=lambda r: r["disk_bytes"])) or "none"
        lines.append(f"- {text} (≤ {bound:.2f}): {names}")
    return lines


def write_doc(result: dict) -> None:
    rows, m, s = result["rows"], result["machine"], result["setting"]
    ref = result.get("torch_reference")
    commands = [f"    {r['command']}" for r in rows if r.get("command")]
    lines = [
        "# SmolLM2-135M: our artifacts against onnxruntime-genai's model builder",
        "",
        ("Made by (the whole file, front.json and front.png; [benchmarks/quality/front.py]"
        "(../../benchmarks/quality/front.py) says how each number is counted and what the builder does):"),
        "", *[f"    {c}" for c in result.get("commands", [result.get("command")])], "",
        (f"Machine: {m['cpu']}, {m['cpus']} CPUs shared with other jobs (1-minute load average before/after each row "
        f"in front.json), ONNX Runtime {m['onnxruntime']} CPUExecutionProvider with 1 intra-op thread, "
        f"onnxruntime-genai {m['onnxruntime_genai']}, {m['date_utc']} (the last command; each row in front.json "
        "has its own time)."),
        "",
        (f"Every row through one loop: perplexity = prefill-only forward of non-overlapping windows of {s['window']} "
        f"tokens (empty past), summed next-token NLL; `test` = the first {s['tokens']} tokens of wiki.test.raw, "
        f"`validation` = the first {s['tokens']} tokens of the validation part of wiki.valid.tokens (its last 25%; "
        "held out for every row calibrated on the first 75% only: the builder's rows calibrate on nothing). "
        f"Decode tok/s: a {s['prompt']}-token prompt, then {s['steps']} greedy steps on the KV cache, median of "
        f"{s['repeats']} after a warm-up. disk MB: model.onnx + its external data (10^6 bytes). bytes/token MB: "
        "initializers as stored, a row-lookup table (embedding, rotary caches) one row, a table shared with the "
        "lm_head in full once, packed 4-bit weights at two a byte."),
        "",
        (f"PyTorch float32 reference (transformers, same windows): validation {ref['validation']['ppl']:.2f}, "
         f"test {ref['test']['ppl']:.2f}." if ref else ""),
        "",
        *main_table(rows),
        "",
        *goal_lines(rows),
        "",
        ("Rows whose files are identical (last column below) are one graph measured twice: their perplexities are "
        "equal and their decode rates differ by the shared machine's noise."),
        "",
        "What each graph is, read from its file (same files: identical model.onnx and data):",
        "",
        *facts_table(rows),
        "",
        "The commands that made the rows' folders (the builder's from this repository's root; cached by folder):",
        "",
        *commands,
        "",
        f"![test perplexity against size]({DOC}.png)",
    ]
    (RESULTS / f"{DOC}.md").write_text("\n".join(lines) + "\n")


def label_points(ax, points: list[tuple[float, float, str]], size: float = 7) -> None:
    """Each point's name beside it (left of it near the right edge); a label that would overlap one placed
    before moves down a line, with a thin line back to its point. Call once the layout is final."""
    scale = 72 / ax.figure.dpi  # display pixels -> points
    right_edge = ax.get_window_extent().x1 * scale
    placed: list[tuple[float, float, float]] = []  # (left, baseline, width) of each label, in points
    for x, y, name in points:
        px, py = (v * scale for v in ax.transData.transform((x, y)))
        width = 0.6 * size * len(name)
        left = px + 5 if px + 5 + width < right_edge else px - 5 - width
        base = py + 3
        while any(abs(base - b) < size + 1 and left < pl + pw and pl < left + width for pl, b, pw in placed):
            base -= size + 2
        placed.append((left, base, width))
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(left - px, base - py), fontsize=size,
                    va="bottom", arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "gray"} if base != py + 3 else None)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    rows, ref = result["rows"], result.get("torch_reference")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for ax, key, xlabel in ((axes[0], "disk_bytes", "disk MB (model.onnx + data)"),
                            (axes[1], "bytes_per_token", "weight MB read per decoded token")):
        for kind, marker, color in (("builder", "s", "tab:blue"), ("ours", "o", "tab:red")):
            chosen = [r for r in rows if r["kind"] == kind]
            if not chosen:
                continue
            xs = [r[key] / 1e6 for r in chosen]
            ys = [r["perplexity"]["test"]["ppl"] for r in chosen]
            ax.scatter(xs, ys, marker=marker, color=color, label="onnxruntime-genai builder" if kind == "builder"
                       else "svd-export (ours)", zorder=3)
        if ref:
            ax.axhline(ref["test"]["ppl"], color="k", ls="--", lw=1, label=f"PyTorch fp32 {ref['test']['ppl']:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"wiki.test.raw perplexity ({result['setting']['tokens']} tokens, log)")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: test perplexity against size, ONNX Runtime CPU", fontsize=11)
    fig.tight_layout()
    for ax, key in ((axes[0], "disk_bytes"), (axes[1], "bytes_per_token")):  # once the layout is final
        label_points(ax, [(r[key] / 1e6, r["perplexity"]["test"]["ppl"], r["row"]) for r in rows])
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = RESULTS / f"{DOC}.json.partial"
    partial.write_text(json.dumps(result, indent=1))
    os.replace(partial, RESULTS / f"{DOC}.json")
    write_doc(result)
    plot(result, RESULTS / f"{DOC}.png")


# ---------------------------------------------------------------- main


def arguments():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--builder", nargs="*", default=list(BUILDER_ROWS), choices=list(BUILDER_ROWS),
                   help="builder rows to build (cached) and measure (none: give the flag alone)")
    p.add_argument("--ours", action="append", default=[], metavar="LABEL=FOLDER",
                   help="an svd-export output folder as a row (repeatable)")
    p.add_argument("--run-ours", action="store_true", help="make our rows with svd-export (cached by folder)")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4])
    p.add_argument("--quantize", nargs="+", choices=("none", "int8", "int4"), default=["none", "int8", "int4"])
    p.add_argument("--method", default=None, help="--run-ours: svd-export --method (default: its default recipe)")
    p.add_argument("--skip-parity", action="store_true", help="--run-ours: pass --skip-parity to svd-export")
    p.add_argument("--ours-options", default="", help="--run-ours: more svd-export options, one string")
    p.add_argument("--tokens", type=int, default=TOKENS, help="tokens of each text")
    p.add_argument("--add", action="store_true",
                   help="measure only the rows given (e.g. --builder with no name and some --ours) and add them to "
                        "the stored front.json, replacing rows of the same label; the doc lists every command")
    return p.parse_args()


def main():
    a = arguments()
    command = command_line().rstrip()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tokenizer = smollm2()
    hf = hf_folder(model, tokenizer)
    texts = texts_of(tokenizer, a.tokens)
    reference = {name: {"ppl": math.exp(nll / count), "nll_sum": nll, "predicted_tokens": count}
                 for name, tokens in texts.items()
                 for nll, count in [nll_sum(torch_logits(model), eval_windows(tokens, WINDOW), progress=False)]}
    print("PyTorch fp32: " + ", ".join(f"{k} {v['ppl']:.3f}" for k, v in reference.items()), flush=True)
    del model
    todo = []
    for label in a.builder:
        precision, extra, what = BUILDER_ROWS[label]
        todo.append((label, "builder", BUILD / label, what, run_builder(hf, BUILD / label, precision, extra)))
    ours = {**(run_ours(tokenizer, a) if a.run_ours else {}), **parse_ours(a.ours)}
    for label, folder in ours.items():
        todo.append((label, "ours", folder, ours_description(folder), build_record(folder)))
    rows = []
    for label, kind, folder, what, built in todo:
        rows.append(measure(label, kind, folder, texts, what, built))
        r = rows[-1]
        print(f"{label}: validation {r['perplexity']['validation']['ppl']:.3f}, test {r['perplexity']['test']['ppl']:.3f}, "
              f"disk {r['disk_bytes'] / 1e6:.1f} MB, {r['bytes_per_token'] / 1e6:.1f} MB/token, "
              f"decode {r['speed']['decode_tokens_s']:.1f} tok/s", flush=True)
    setting = {"window": WINDOW, "tokens": a.tokens, "prompt": PROMPT, "steps": STEPS, "repeats": REPEATS,
               "test": "wiki.test.raw", "validation": "wiki.valid.tokens, validation part (exporter/data/splits.py)"}
    result = {"commands": [command], "setting": setting, "machine": machine(), "torch_reference": reference,
              "rows": rows}
    if a.add:  # the stored rows stay, measured by their own commands on the same setting
        stored = json.loads((RESULTS / f"{DOC}.json").read_text())
        if stored["setting"] != setting:
            raise SystemExit(f"--add: the stored rows were measured with {stored['setting']}, not {setting}")
        added = {r["row"] for r in rows}
        result["commands"] = stored.get("commands", [stored.get("command")]) + [command]
        result["rows"] = [r for r in stored["rows"] if r["row"] not in added] + rows
    write_results(result)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
