"""GPU benchmark on 7B-shaped random-weight models (OPT-6.7B, Llama-2-7B): time and memory do not depend
on the weights' values, only on the shapes.

  compress    --method (svd-llm-v2 by default; adasvd; default = the default recipe of exporter/recipe.py)
              at ratio 0.4 with 256×2048 calibration tokens, the method's own allocation: wall time, seconds
              per layer and pass, peak GPU memory
  throughput  ONNX Runtime CUDA tokens/s, dense vs compressed at ratios 0.2/0.4/0.6 (float16), with the
              PyTorch eager (generate) rows and the weight-bytes bound on the decode speedup; --graph fused
              (the CLI's default graph) or plain, --cuda-graph to replay the fused graph's decode step
  render      docs/results/gpu.md and docs/results/gpu_speedup.png from the measurements

Each part appends its measurements (with the command, device, versions and date) to a JSON file and
prints them, so a part fits in one device command and the document only holds printed numbers. See
docs/gpu-howto.md for the device commands."""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.common import RESULTS, command_line
from exporter.cli import compression_config
from exporter.config import CompressionConfig
from exporter.loop.compress import compress_
from exporter.model.candidates import list_matrices
from exporter.model.discovery import architecture_of
from exporter.model.lowrank import build_skeleton
from exporter.onnx.fused import build_onnx
from exporter.onnx.plain import export_compressed, export_onnx
from exporter.plan.rounding import round_ranks
from exporter.plan.uniform import uniform
from exporter.recipe import recipe_name
from exporter.validate.bound import bound_block
from exporter.validate.providers import resolve_provider
from exporter.validate.throughput import ThroughputSettings, eager_throughput, ort_throughput

# The published configurations (config.json of facebook/opt-6.7b and meta-llama/Llama-2-7b-hf).
SHAPES = {
    "opt-6.7b": ("OPTConfig", dict(vocab_size=50272, hidden_size=4096, ffn_dim=16384, num_hidden_layers=32,
                                   num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=4096,
                                   do_layer_norm_before=True, enable_bias=True)),
    "llama-2-7b": ("LlamaConfig", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                       max_position_embeddings=4096, rms_norm_eps=1e-5)),
}


DTYPES = {"float16": torch.float16, "float32": torch.float32}


def random_model(name: str, layers: int | None, dtype=torch.float16, device="cuda"):
    import transformers
    class_name, fields = SHAPES[name]
    config = getattr(transformers, class_name)(**{**fields, **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def low_rank_copy_(model, ratio: float, rank_multiple: int = 1) -> dict:
    """Swap every linear for a LowRankLinear of the uniform rank for `ratio`, rounded as --rank-multiple does
    (random factors: the speed of a pair of matmuls depends on its shapes only).
    -> report.json-style layers {name: rank, shape}."""
    matrices = list_matrices(model, architecture_of(model))
    plan = round_ranks(matrices, uniform(matrices, None, ratio), rank_multiple)
    build_skeleton(model, plan)
    with torch.no_grad():
        for name in plan:
            for p in model.get_submodule(name).parameters():
                p.normal_(0.0, 0.02)
    shapes = {m.name: [m.out_features, m.in_features] for m in matrices}
    return {name: {"rank": rank, "shape": shapes[name]} for name, rank in plan.items()}


def environment() -> dict:
    import onnxruntime
    import transformers
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command_line()}


def part_compress(name: str, args) -> dict:
    model = random_model(name, args.layers, DTYPES[args.dtype], args.device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.calib_samples, args.calib_seqlen), generator=gen)
    batches = list(ids.split(args.calib_batch_size))
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    config = (compression_config(None, 0.4, len(batches)) if args.method == "default"
              else CompressionConfig(method=args.method, ratio=0.4))
    result = compress_(model, batches, config, device=args.device)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    dense, after = result.linear_params()
    refined = result.extra.get("refine", {}).values()
    return {"part": "compress", "model": name, "layers": model.config.num_hidden_layers, "method": args.method,
            "allocation": config.allocation_name, "recipe": recipe_name(config),
            # random weights: refinement may stop early, so the steps it ran go with its seconds
            "refine_steps_run": [e["steps_run"] for e in refined],
            "ratio": 0.4, "calibration": f"{args.calib_samples}x{args.calib_seqlen}",
            "wall_s": wall, "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "realized_linears": 1 - after / dense,
            # seconds per decoder layer and pass (profile = the v2 allocation's loss pass, compress = factorize)
            "layer_seconds": {k: [round(x, 2) for x in v] for k, v in result.layer_seconds.items()}}


class IdsOnlyTokenizer:
    """Random-weight models have no tokenizer; the ONNX folder's sidecars only need its special ids."""

    def __init__(self, config):
        self.bos_token_id, self.eos_token_id, self.pad_token_id = config.bos_token_id, config.eos_token_id, None

    def save_pretrained(self, folder):
        pass


def write_graph(args, model, folder: Path) -> Path:
    """The model's decoder graph as the CLI writes it: --graph fused (ORT's fused ops built from the weights,
    the CLI's default) or plain (torch.onnx's export)."""
    if args.graph == "fused":
        return build_onnx(model, IdsOnlyTokenizer(model.config), folder, args.dtype)
    return export_onnx(model, IdsOnlyTokenizer(model.config), folder, args.dtype)


def dense_graph(name: str, args, model) -> Path:
    """The dense model.onnx, exported once per (model, layers, dtype, graph) into --work and reused by later
    calls while the machine stays warm (a 7B export takes minutes)."""
    c = model.config  # the width is in the key too: a smoke run with a shrunk shape must not reuse a 7B graph
    folder = args.work / f"{name}-{c.num_hidden_layers}x{c.hidden_size}-{args.dtype}-{args.graph}" / "dense"
    if not (folder / "model.onnx").is_file():
        write_graph(args, model, folder)
    return folder / "model.onnx"


def part_throughput(name: str, args):
    """Ratio 0 is the dense model; every other ratio is the pipeline's compressed graph: built from the
    LowRankLinear factors (fused), or the dense graph rewritten with them (plain: export_compressed). Yields
    one row per ratio, so a call that runs out of time keeps the ratios it finished. --cuda-graph: the fused
    graph's decode steps run as one captured CUDA graph (static shapes on its shared KV buffer)."""
    provider = resolve_provider(args.provider)
    settings = ThroughputSettings(batch=args.batch, prefill=args.prefill, decode=args.decode,
                                  warmup=args.warmup, repeats=args.repeats)
    for ratio in args.ratios:
        model = random_model(name, args.layers, DTYPES[args.dtype], args.device)
        dense_path = dense_graph(name, args, model)
        row = {"part": "throughput", "model": name, "layers": model.config.num_hidden_layers, "ratio": ratio,
               "rank_multiple": args.rank_multiple, "provider": provider, "dtype": args.dtype,
               "graph": args.graph, "cuda_graph": args.cuda_graph, "settings": asdict(settings)}
        if ratio > 0:
            layers = low_rank_copy_(model, ratio, args.rank_multiple)
            row.update(bound_block(random_model(name, args.layers, DTYPES[args.dtype], "meta"), layers))
        row["eager"] = eager_throughput(model, settings)
        print(json.dumps({"model": name, "ratio": ratio, "eager": row["eager"]}), flush=True)
        with tempfile.TemporaryDirectory(prefix="gpu-bench-", dir=args.work) as tmp:
            if ratio == 0:
                path = dense_path
            elif args.graph == "fused":
                path = write_graph(args, model, Path(tmp))
            else:
                path = export_compressed(dense_path, model, Path(tmp))[0]
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            row["ort"] = ort_throughput(path, provider, settings, cuda_graph=args.cuda_graph)
        print(json.dumps({"model": name, "ratio": ratio, "ort": row["ort"]}), flush=True)
        yield row


def record(rows: list[dict], path: Path) -> None:
    env = environment()
    existing = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(existing + [{**row, **env} for row in rows], indent=2))
    for row in rows:
        print(json.dumps({**row, **env}), flush=True)


def _fmt(value, spec=",.1f"):
    return "–" if value is None else format(value, spec)


def _group(row: dict) -> tuple:
    """Rows comparable with each other: one call's model, depth, rank rounding, graph and protocol. Rows
    written before --rank-multiple existed used the uniform ranks unrounded, i.e. multiple 1; rows written
    before --graph measured the plain graph, without CUDA graphs."""
    s = row["settings"]
    return (row["model"], row["layers"], row.get("rank_multiple", 1), row.get("graph", "plain"),
            row.get("cuda_graph", False), row["dtype"], row["provider"], s["batch"], s["prefill"], s["decode"],
            s["repeats"], row["device"])


RATES = [("ort", "prefill"), ("ort", "decode"), ("eager", "prefill"), ("eager", "decode")]


def render(results: list[dict], folder: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# GPU results (7B-shaped random-weight models)", "",
             "Generated by `python -m benchmarks.speed.gpu render` from `docs/results/gpu.json`; each row names the command "
             "that printed it. Weights are random: time and memory depend on the shapes only.", ""]
    compress = [r for r in results if r["part"] == "compress"]
    if compress:
        lines += ["## Compression (ratio 0.4, each method with its own allocation: a profile pass and a compression pass)",
                  "", "| model | method | layers | calibration | wall time s | profile s/layer | compress s/layer | "
                  "32 layers at that rate, min | peak GPU MB | realised ratio | device | date | command |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in compress:
            sec = r.get("layer_seconds", {})
            per_layer = [sum(v) / len(v) for v in (sec.get("profile"), sec.get("compress")) if v]
            extrapolated = 32 * sum(per_layer) / 60 if len(per_layer) == 2 else None
            # rows before "recipe": method + allocation (before --method: svd-llm-v2 + v2)
            method = r.get("recipe") or f"{r['method']} + {r.get('allocation', 'v2')}"
            if r.get("refine_steps_run"):
                refine = sec["refine"]
                method += (f" (refine {sum(refine) / len(refine):.1f} s/layer, "
                           f"{sum(r['refine_steps_run']) / len(refine):.0f} steps run)")
            lines.append(f"| {r['model']} | {method} | {r['layers']} | {r['calibration']} | {r['wall_s']:.1f} | "
                         f"{_fmt(per_layer[0] if per_layer else None)} | {_fmt(per_layer[1] if len(per_layer) == 2 else None)} | "
                         f"{_fmt(extrapolated)} | {_fmt(r['peak_gpu_mb'], ',.0f')} | {r['realized_linears']:.4f} | "
                         f"{r['device']} | {r['date']} | `{r['command']}` |")
        lines += ["", "The 32-layer column multiplies the measured seconds per layer by 32 (an extrapolation, not a "
                  "run); the calibration capture and the model load are not in it.", ""]
    speed = [r for r in results if r["part"] == "throughput"]
    groups = {}
    for r in speed:
        groups.setdefault(_group(r), []).append(r)
    bars = []  # (label, speedups per RATES)
    for key, rows in groups.items():
        model, layers, multiple, graph, cuda_graph, dtype, provider, batch, prefill, decode, repeats, device = key
        rows.sort(key=lambda r: r["ratio"])
        dense = next((r for r in rows if r["ratio"] == 0.0), None)
        lines += [f"## Throughput: {model}, {layers} layers, ranks a multiple of {multiple} ({graph} graph"
                  f"{', CUDA graphs' if cuda_graph else ''}, {dtype}, {provider}, "
                  f"batch {batch}, prefill {prefill}, decode {decode}, median of {repeats}, {device})", "",
                  "| ratio | ORT prefill tok/s | ORT decode tok/s | ORT peak GPU MB | eager prefill tok/s | "
                  "eager decode tok/s | eager peak GPU MB | ORT prefill × | ORT decode × | eager prefill × | "
                  "eager decode × | decode bound × | ORT / eager decode |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            # speedup = compressed / dense of the same call; none without a dense row in the group
            ups = [r[e][f"{k}_tokens_s"] / dense[e][f"{k}_tokens_s"] if dense else None for e, k in RATES]
            lines.append(f"| {r['ratio']:.1f} | {_fmt(r['ort']['prefill_tokens_s'])} | {_fmt(r['ort']['decode_tokens_s'])} | "
                         f"{_fmt(r['ort']['peak_gpu_mb'], ',.0f')} | {_fmt(r['eager']['prefill_tokens_s'])} | "
                         f"{_fmt(r['eager']['decode_tokens_s'])} | {_fmt(r['eager']['peak_gpu_mb'], ',.0f')} | "
                         + " | ".join(_fmt(u, ".2f") for u in ups) + f" | {_fmt(r.get('bound_decode_speedup'), '.2f')} | "
                         f"{r['ort']['decode_tokens_s'] / r['eager']['decode_tokens_s']:.2f} |")
            if dense and r["ratio"] > 0:
                bars.append((f"{layers} layers, ratio {r['ratio']:.1f}, rank ×{multiple}, {graph}"
                             f"{' + CUDA graphs' if cuda_graph else ''}", ups))
        lines += ["", f"torch {rows[0]['torch']}, onnxruntime {rows[0]['onnxruntime']}, {rows[0]['date']}; "
                  f"command `{rows[0]['command']}`.", ""]
    if bars:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / len(bars)
        for i, (label, ups) in enumerate(bars):
            ax.bar([j + i * width for j in range(len(RATES))], ups, width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + width * (len(bars) - 1) / 2 for j in range(len(RATES))],
                      [f"{e.upper() if e == 'ort' else e} {k}" for e, k in RATES])
        ax.set_ylabel("compressed / dense tokens/s")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "gpu_speedup.png", dpi=110)
        plt.close(fig)
        lines += ["![compressed / dense tokens/s](gpu_speedup.png)", ""]
    (folder / "gpu.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["compress", "throughput", "render"])
    parser.add_argument("--model", choices=sorted(SHAPES), action="append", help="repeatable; default: both")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's 32)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6], help="0 = dense")
    parser.add_argument("--rank-multiple", type=int, default=1,
                        help="throughput: every rank a multiple of this (tensor cores want multiples of 8 or more)")
    parser.add_argument("--method", default="svd-llm-v2", choices=["svd-llm-v2", "adasvd", "default"],
                        help="compress: the factorization (with its paper's allocation), or the default recipe")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--calib-seqlen", type=int, default=2048)
    parser.add_argument("--calib-batch-size", type=int, default=8)
    parser.add_argument("--provider", default="cuda", choices=["cuda", "cpu", "auto"])
    parser.add_argument("--graph", default="fused", choices=["fused", "plain"],
                        help="throughput: the CLI's default fused graph, or the plain torch.onnx export")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="throughput, fused graph on CUDA: capture the decode step once and replay it")
    parser.add_argument("--device", default="cuda", help="torch device of the models (cpu only for a smoke run)")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=1024)
    parser.add_argument("--decode", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS / "gpu.json")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "svd-export-gpu-bench",
                        help="where the dense graphs are kept between calls")
    args = parser.parse_args()
    if args.part == "render":
        render(json.loads(args.results.read_text()), args.results.parent)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    for name in args.model or sorted(SHAPES):
        rows = [part_compress(name, args)] if args.part == "compress" else part_throughput(name, args)
        for row in rows:
            record([row], args.results)


if __name__ == "__main__":
    main()
