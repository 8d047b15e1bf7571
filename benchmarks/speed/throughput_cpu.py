"""ONNX Runtime CPU throughput of SmolLM2-135M against its weight-bytes bound, with perplexity beside each row.

    OMP_NUM_THREADS=1 python -m benchmarks.speed.throughput_cpu

Rows (every graph is the fused one, exporter/onnx/fused, unless it says plain):
  dense float32 / compressed at each --ratios (float32) / int4 / compressed + int4 / int8;
  quantization settings on the dense model (block 64 and 128, asymmetric, accuracy level 0, int4 lm_head);
  the plain graph (torch.onnx dynamo + low-rank rewrite) dense and at --plain-ratio, for fused vs plain.

Every graph is written first; then the rows are measured in --rounds interleaved rounds (each round measures
every row once, in the same order), so a change of the shared machine's speed during the run (other jobs,
other tenants of the host's memory bandwidth) falls on every row alike instead of on the rows measured at that
moment. A row's speedup is the median over rounds of its tokens/s over the dense row's of the same round.

Each row: prefill and decode tokens/s at every --batches (exporter/validate/throughput.py: IO binding on
preallocated buffers; the median over the rounds of the median of --repeats), the bytes of weights one decoded
token reads, counted on the graph (exporter/validate/bound.py), the bound on the decode speedup (dense float32
bytes / row bytes), the measured speedup over dense float32 (same graph kind, same batch), ORT perplexity on
--eval-tokens of wiki.test.raw, and the size on disk. Compression: --method (default adasvd with its adaCR allocation),
calibration --calib-samples × --calib-seqlen tokens of wiki.valid.tokens.

Writes docs/results/throughput-cpu.{json,md,png}. ONNX Runtime and PyTorch run with OMP_NUM_THREADS
intra-op threads (1 if unset); the 1-minute load average is recorded before and after every round.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.common import RESULTS, calibration, command_line, smollm2, wiki_test_tokens
from exporter import CompressionConfig, compress_
from exporter.config import Quantization
from exporter.onnx.fused import build_onnx
from exporter.onnx.plain import export_compressed, export_onnx
from exporter.validate.bound import graph_decode_weight_bytes
from exporter.validate.ort_session import OrtDecoder
from exporter.validate.perplexity import perplexity
from exporter.validate.providers import CPU, open_session
from exporter.validate.throughput import (
    OrtDecodeLoop,
    ThroughputSettings,
    folder_config,
    rates,
    read_signature,
    shares_kv_buffer,
)

INT4 = Quantization(bits=4)
SETTINGS_ROWS = {  # dense model, one quantization setting changed from the default int4
    "int4 block 64": replace(INT4, block_size=64),
    "int4 block 128": replace(INT4, block_size=128),
    "int4 asymmetric": replace(INT4, symmetric=False),
    "int4 accuracy level 0": replace(INT4, accuracy_level=0),
    "int4, int4 lm_head": replace(INT4, head_bits=4),
}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


def describe(path: Path, label: str, ratio: float, quant: str, graph: str, args, eval_ids, threads: int) -> dict:
    """A row before timing: bytes read per token, size on disk, ORT perplexity (fused rows)."""
    row = {"label": label, "ratio": ratio, "weights": quant, "graph": graph, "path": str(path),
           "weight_bytes": graph_decode_weight_bytes(path), "disk_bytes": folder_bytes(path.parent)}
    if graph == "fused":  # the plain rows compute the same model as the fused float32 ones (tests/test_onnx_*)
        decoder = OrtDecoder.load(path, providers=[CPU], threads=threads)
        row["perplexity"] = perplexity(decoder.logits_fn(), eval_ids, args.window, progress=False)
        del decoder
    print(f"{label:28s} {row['weight_bytes'] / 1e6:8.1f} MB/token  ppl {row.get('perplexity', float('nan')):.3f}",
          flush=True)
    return row


def time_rounds(rows: list[dict], args, threads: int) -> list[list[float]]:
    """--rounds rounds, each measuring every row at every batch once. -> the load averages before/after each round.
    Every row's session and decode loops are opened (and warmed up) once, before the first round, so a round takes
    a minute or two and a row is timed close to its base. Each row gets row["rounds"][f"b{batch}"]: its per-round
    rates, and row[f"b{batch}"]: their medians."""
    loops = {}
    for row in rows:
        path = Path(row["path"])
        session = open_session(path, CPU, threads=threads)
        signature = read_signature(session, folder_config(path.parent))
        for batch in args.batches:
            settings = ThroughputSettings(batch=batch, prefill=args.prefill, decode=args.decode, warmup=1,
                                          repeats=args.repeats, threads=threads)
            # the graph's own KV protocol, as ort_throughput picks it (the committed results predate it: every
            # row then used two alternating buffers; docs/throughput.md)
            loop = OrtDecodeLoop(session, signature, CPU, settings, shared_kv=shares_kv_buffer(path.parent))
            loop.run_once()  # warm-up
            loops[row["label"], batch] = loop
    loads = []
    for index in range(args.rounds):
        before = os.getloadavg()[0]
        for row in rows:
            for batch in args.batches:
                loop = loops[row["label"], batch]
                rate = rates([loop.run_once() for _ in range(args.repeats)], loop.s, None)
                row.setdefault("rounds", {}).setdefault(f"b{batch}", []).append(rate)
        loads.append([before, os.getloadavg()[0]])
        first = f"b{args.batches[0]}"
        line = ", ".join(f"{r['label']} {r['rounds'][first][-1]['decode_tokens_s']:.1f}" for r in rows)
        print(f"round {index + 1}/{args.rounds} (load {before:.1f}->{loads[-1][1]:.1f}) {first} decode: {line}",
              flush=True)
    for row in rows:
        for batch in args.batches:
            samples = row["rounds"][f"b{batch}"]
            row[f"b{batch}"] = {key: statistics.median(s[key] for s in samples)
                                for key in ("prefill_tokens_s", "decode_tokens_s", "end_to_end_tokens_s")}
    return loads


def round_ratios(row: dict, base: dict, batch: int) -> list[float]:
    """Decode tokens/s of `row` over `base`'s, round by round."""
    return [mine["decode_tokens_s"] / theirs["decode_tokens_s"]
            for mine, theirs in zip(row["rounds"][f"b{batch}"], base["rounds"][f"b{batch}"])]


def add_ratios(rows: list[dict], batches: list[int]) -> None:
    """Speedup over dense float32 of the same graph kind and batch: the median over rounds of the ratio within a
    round (a row and its base timed within about a minute, not an hour apart), with its range; the bound, for
    every row."""
    for row in rows:
        base = next(r for r in rows if r["ratio"] == 0 and r["weights"] == "float32" and r["graph"] == row["graph"])
        row["bound"] = base["weight_bytes"] / row["weight_bytes"]
        for b in batches:
            per_round = round_ratios(row, base, b)
            speedup = statistics.median(per_round)
            row[f"b{b}"].update(speedup=speedup, of_bound=speedup / row["bound"], speedup_range=[min(per_round),
                                                                                              max(per_round)])


# ---------------------------------------------------------------------------------------------- report


def fmt(value, digits=2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def row_table(rows: list[dict], batches: list[int]) -> list[str]:
    """The table of `rows`: bytes, bound, each batch's rates and speedups, perplexity, size on disk."""
    head = "| row | weights | MB read / token | bound | " + " | ".join(
        f"b{b} prefill tok/s | b{b} decode tok/s | b{b} speedup | b{b} speedup / bound" for b in batches) + \
        " | ORT perplexity | disk MB |"
    lines = [head, "|" + "---|" * (4 + 4 * len(batches) + 2)]
    for r in rows:
        cells = [r["label"], r["weights"], fmt(r["weight_bytes"] / 1e6, 1), f"×{r['bound']:.2f}"]
        for b in batches:
            t = r[f"b{b}"]
            cells += [fmt(t["prefill_tokens_s"], 1), fmt(t["decode_tokens_s"]), f"×{t['speedup']:.2f}",
                      fmt(t["of_bound"])]
        lines.append("| " + " | ".join(cells + [fmt(r.get("perplexity")), fmt(r["disk_bytes"] / 1e6, 0)]) + " |")
    return lines


def fused_versus_plain(rows: list[dict], batches: list[int]) -> list[str]:
    """Each ratio with a plain row: its decode and prefill rates beside the fused float32 row's."""
    plain = {r["ratio"]: r for r in rows if r["graph"] == "plain"}
    fused = {r["ratio"]: r for r in rows if r["graph"] == "fused" and r["weights"] == "float32"}
    versus = ["| ratio | batch | plain decode tok/s | fused decode tok/s | fused / plain | plain prefill | fused prefill |",
              "|---|---|---|---|---|---|---|"]
    for ratio, p in sorted(plain.items()):
        for b in batches:
            f, q = fused[ratio][f"b{b}"], p[f"b{b}"]
            fused_over_plain = statistics.median(round_ratios(fused[ratio], p, b))
            versus.append(f"| {ratio} | {b} | {fmt(q['decode_tokens_s'])} | {fmt(f['decode_tokens_s'])} | "
                          f"×{fused_over_plain:.2f} | {fmt(q['prefill_tokens_s'], 1)} | "
                          f"{fmt(f['prefill_tokens_s'], 1)} |")
    return versus


def over_dense_int4(int4: list[dict], batches: list[int]) -> list[str]:
    """The int4 rows against dense int4 (ratio 0): their own bound and decode speedup."""
    base4 = next((r for r in int4 if r["ratio"] == 0), None)
    on_int4 = ["| ratio | MB read / token | bound over dense int4 | " + " | ".join(
        f"b{b} decode speedup over dense int4 | b{b} speedup / bound" for b in batches) + " |",
        "|" + "---|" * (3 + 2 * len(batches))]
    for r in int4:
        bound = base4["weight_bytes"] / r["weight_bytes"]
        cells = [str(r["ratio"]), fmt(r["weight_bytes"] / 1e6, 1), f"×{bound:.2f}"]
        for b in batches:
            speedup = statistics.median(round_ratios(r, base4, b))
            cells += [f"×{speedup:.2f}", fmt(speedup / bound)]
        on_int4.append("| " + " | ".join(cells) + " |")
    return on_int4


def protocol(meta: dict, batches: list[int]) -> list[str]:
    """The document's head: the command, the machine, the protocol and what the columns mean."""
    return [
        "# ONNX Runtime CPU throughput of SmolLM2-135M against the weight-bytes bound",
        "",
        "Made by one command (the whole file, the JSON and the PNG):",
        "",
        f"    {meta['command']}",
        "",
        f"Machine: {meta['machine']}; {meta['cpus']} CPUs shared with other jobs (the 1-minute load average "
        f"before/after every round is in the JSON: {meta['load_min']:.1f} to {meta['load_max']:.1f} during this run), "
        f"ONNX Runtime {meta['onnxruntime']} CPUExecutionProvider with {meta['threads']} intra-op thread(s), "
        f"{meta['date']}. Settings: prefill {meta['prefill']}, decode {meta['decode']} tokens; every row measured "
        f"once per round in {meta['rounds']} interleaved rounds (each time the median of {meta['repeats']} run(s); "
        f"every row's session opened and warmed up once before the first round): tokens/s are the medians over the rounds, a speedup the median over the rounds of the ratio "
        f"within a round (its range is in the JSON); perplexity over {meta['eval_tokens']} tokens of wiki.test.raw "
        f"in windows of {meta['window']} (a short evaluation); compression {meta['method']} "
        f"({meta['allocation']}) calibrated on {meta['calib']} tokens of wiki.valid.tokens.",
        "",
        "- **MB read / token**: bytes of weights one decoded token reads, counted on the graph: quantized weights as "
        "stored (packed blocks, scales), an embedding table one row (exporter/validate/bound.py).",
        "- **bound**: dense float32 bytes / the row's bytes, the most decoding can speed up when it only moves "
        "weights. **speedup**: decode tokens/s over dense float32 (fused graph, same batch). "
        "**speedup / bound**: the issue's goal is ≥ 0.9 at every ratio.",
        f"- Between the first and the last round the dense float32 row's batch-{batches[0]} decode rate ranged "
        f"{meta['dense_range'][0]:.2f}–{meta['dense_range'][1]:.2f} tokens/s: the shared machine's own drift, which "
        f"the ratios within a round cancel.",
    ]


def write_markdown(rows: list[dict], meta: dict, batches: list[int]) -> None:
    main = [r for r in rows if r["graph"] == "fused" and r["label"] not in SETTINGS_ROWS]
    settings = [r for r in rows if r["label"] in SETTINGS_ROWS or r["label"] in ("dense int4", "dense int8")]
    text = [
        *protocol(meta, batches),
        "",
        "## Every ratio, float32 and int4 (fused graph)",
        "",
        *row_table(main, batches),
        "",
        "Low rank on top of int4: the compressed int4 rows against dense int4 (the bound counted the same way).",
        "",
        *over_dense_int4([r for r in main if r["weights"] == "int4"], batches),
        "",
        "## Fused graph against the plain one",
        "",
        "The plain graph is torch.onnx's dynamo export with the low-rank rewrite (`--onnx-graph plain`); "
        "the fused graph is built from the weights with ORT's fused ops (`--onnx-graph fused`, the default). "
        "Same weights, same protocol. The issue's goal: fused ≥ 1.5× plain decode.",
        "",
        *fused_versus_plain(rows, batches),
        "",
        "## Quantization settings",
        "",
        "The dense model under the default int4 setting (symmetric, block 32, accuracy level 4 = int8 activations "
        "inside MatMulNBits, lm_head int8) and with one setting changed; int8 beside them.",
        "",
        *row_table(settings, batches),
        "",
        "![speedup against the bound, perplexity against bytes](throughput-cpu.png)",
        "",
    ]
    (RESULTS / "throughput-cpu.md").write_text("\n".join(text))


def plot(rows: list[dict], batches: list[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    fused = [r for r in rows if r["graph"] == "fused" and r["label"] not in SETTINGS_ROWS]
    top = max(r["bound"] for r in fused) * 1.08
    left.plot([1, top], [1, top], color="grey", lw=1, label="bound")
    left.plot([1, top], [0.9, 0.9 * top], color="grey", lw=1, ls="--", label="0.9 × bound")
    for b, marker in zip(batches, "os^D"):
        for weights, color in (("float32", "tab:blue"), ("int4", "tab:orange"), ("int8", "tab:green")):
            pts = [r for r in fused if r["weights"] == weights]
            if pts:
                left.scatter([r["bound"] for r in pts], [r[f"b{b}"]["speedup"] for r in pts], marker=marker,
                             color=color, label=f"{weights}, batch {b}")
    for r in fused:
        left.annotate(r["label"].replace("compressed ", ""), (r["bound"], r[f"b{batches[0]}"]["speedup"]),
                      fontsize=7, xytext=(3, -9), textcoords="offset points")
    left.set(xlabel="weight-bytes bound (dense float32 bytes / row bytes)", ylabel="decode speedup over dense float32",
             title="ORT CPU decode speedup against its bound")
    left.legend(fontsize=7)
    for weights, color in (("float32", "tab:blue"), ("int4", "tab:orange"), ("int8", "tab:green")):
        pts = sorted((r for r in fused if r["weights"] == weights), key=lambda r: r["weight_bytes"])
        right.plot([r["weight_bytes"] / 1e6 for r in pts], [r["perplexity"] for r in pts], marker="o", color=color,
                   label=weights)
        for r in pts:
            right.annotate(r["label"].replace("compressed ", ""), (r["weight_bytes"] / 1e6, r["perplexity"]),
                           fontsize=7, xytext=(3, 3), textcoords="offset points")
    right.set(xscale="log", yscale="log", xlabel="MB of weights read per decoded token",
              ylabel="ORT perplexity (wikitext-2, short eval)", title="Perplexity against bytes: the frontier")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput-cpu.png", dpi=120)


# ---------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", default="0.2,0.4,0.6,0.8")
    p.add_argument("--plain-ratio", type=float, default=0.6)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--prefill", type=int, default=64)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="runs per row and round (median)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds over all rows (median)")
    p.add_argument("--method", default="adasvd")
    p.add_argument("--allocation", default=None)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--work", default=None, help="scratch folder for the graphs (default: a temporary one)")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def write_graphs(model, tokenizer, batches, ratios: list[float], eval_ids, args, threads: int,
                 work: Path) -> tuple[list[dict], dict]:
    """Every row's graph written under `work` and described (bytes, size, perplexity), untimed: the dense
    rows, the quantization settings, then each ratio compressed (float32, int4, plain at --plain-ratio).
    -> (the rows, {ratio: the compression's allocation and seconds})."""
    rows: list[dict] = []

    def run(label, variant_model, ratio, quant: Quantization | None, graph="fused", dense_plain=None):
        folder = work / label.replace(" ", "_").replace(",", "")
        if graph == "fused":
            path = build_onnx(variant_model, tokenizer, folder, "float32", quant)
        elif dense_plain is None:
            path = export_onnx(variant_model, tokenizer, folder, "float32")
        else:
            path, _ = export_compressed(dense_plain, variant_model, folder)
        name = "float32" if quant is None else quant.name
        rows.append(describe(path, label, ratio, name, graph, args, eval_ids, threads))
        return path

    dense_plain = run("dense plain", model, 0.0, None, graph="plain")
    run("dense", model, 0.0, None)
    run("dense int4", model, 0.0, INT4)
    run("dense int8", model, 0.0, Quantization(bits=8))
    for label, quant in SETTINGS_ROWS.items():
        run(label, model, 0.0, quant)
    compression = {}
    for ratio in ratios:
        compressed = copy.deepcopy(model)
        start = time.perf_counter()
        config = CompressionConfig(method=args.method, ratio=ratio, allocation=args.allocation)
        result = compress_(compressed, batches, config, progress=False)
        compression[str(ratio)] = {"allocation": result.allocation, "seconds": time.perf_counter() - start}
        run(f"compressed {ratio}", compressed, ratio, None)
        run(f"compressed {ratio} int4", compressed, ratio, INT4)
        if ratio == args.plain_ratio:
            run(f"compressed {ratio} plain", compressed, ratio, None, graph="plain", dense_plain=dense_plain)
        del compressed
    return rows, compression


def metadata(command: str, rows: list[dict], loads: list[list[float]], compression: dict, eval_ids, args,
             threads: int) -> dict:
    """The JSON's `meta`: the command, machine, versions, date, protocol and the load during the rounds."""
    import onnxruntime
    loads = [x for pair in loads for x in pair]
    dense = next(r for r in rows if r["label"] == "dense")
    dense_rates = [rate["decode_tokens_s"] for rate in dense["rounds"][f"b{args.batches[0]}"]]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"command": command, "machine": cpu, "cpus": os.cpu_count(), "threads": threads,
            "onnxruntime": onnxruntime.__version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "prefill": args.prefill, "decode": args.decode, "repeats": args.repeats, "rounds": args.rounds,
            "dense_range": [min(dense_rates), max(dense_rates)], "eval_tokens": int(eval_ids.numel()),
            "window": args.window, "method": args.method,
            "allocation": next(iter(compression.values()))["allocation"] if compression else None,
            "calib": f"{args.calib_samples}×{args.calib_seqlen}", "load_min": min(loads), "load_max": max(loads),
            "compression": compression, "int4_default": asdict(INT4)}


def main():
    args = parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    command = command_line()

    model, tokenizer = smollm2()
    eval_ids = wiki_test_tokens(model, tokenizer, args.eval_tokens)
    batches = calibration(model, tokenizer, args.calib_samples, args.calib_seqlen)
    work = Path(args.work or tempfile.mkdtemp(prefix="throughput-cpu-"))
    rows, compression = write_graphs(model, tokenizer, batches, ratios, eval_ids, args, threads, work)
    del model
    loads = time_rounds(rows, args, threads)  # every graph is on disk: now the timings, interleaved
    add_ratios(rows, args.batches)
    meta = metadata(command, rows, loads, compression, eval_ids, args, threads)
    for row in rows:
        del row["path"]  # a scratch folder, gone after the run
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput-cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_markdown(rows, meta, args.batches)
    plot(rows, args.batches)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {RESULTS / 'throughput-cpu.md'}, .json, .png")


if __name__ == "__main__":
    main()
