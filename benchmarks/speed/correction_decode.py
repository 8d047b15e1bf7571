"""What `--correction-rank` costs in decode speed at a real width: a Llama-2-7B-shaped checkpoint of a few
decoder layers (random weights: speed depends on the shapes only), exported by the CLI with GPTQ int4 at ratio
0, with and without the rank-R float corrections beside every decoder linear; then ONNX Runtime CPU decode
tokens/s through benchmarks/quality/front.py's loop (1 intra-op thread, a 64-token prompt, 64 greedy steps, a
warm-up then the median of 3).

    OMP_NUM_THREADS=1 python -m benchmarks.speed.correction_decode --layers 2 --rank 4

At SmolLM2-135M's width (576) the correction's two small MatMuls and its Add per linear are mostly node
overhead (docs/results/front.md); at 4096 × 11008 a rank-4 pair is 0.1–0.2 % of its linear's multiply-adds.
Writes docs/results/correction-decode.md (+ .json). The checkpoint and the exports go under build/ (cached:
a folder with its model.onnx is reused).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import onnx
import torch

from benchmarks.common import RESULTS, ROOT, WIKITEXT, command_line
from benchmarks.quality.front import decode_speed, disk_bytes, onnx_file, open_decoder
from benchmarks.scale.scale import make_checkpoint

WORK = ROOT / "build" / "correction-decode"
DOC, STORE = RESULTS / "correction-decode.md", RESULTS / "correction-decode.json"


def export(checkpoint: Path, out: Path, rank: int, block: int) -> float:
    """svd-export --ratio 0 --quantize int4 (GPTQ) [--correction-rank rank] -> wall seconds (0: cached)."""
    if (out / "model.onnx").exists():
        return 0.0
    cmd = [sys.executable, "-m", "exporter.cli", "--model", str(checkpoint), "--ratio", "0", "--format", "onnx",
           "--quantize", "int4", "--head-bits", "4", "--block-size", str(block), "--calib-data",
           str(WIKITEXT / "wiki.valid.tokens"), "--calib-samples", "4", "--calib-seqlen", "64", "--eval-data", "none",
           "--skip-parity", "--overwrite", "-q", "--out", str(out), *(["--correction-rank", str(rank)] if rank else [])]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def node_counts(path: Path) -> dict[str, int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    return {"nodes": len(ops), "MatMulNBits": ops.count("MatMulNBits"), "MatMul": ops.count("MatMul")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    args = p.parse_args()
    checkpoint = WORK / f"llama-2-7b-{args.layers}-layers"
    if not (checkpoint / "config.json").exists():
        make_checkpoint("llama-2-7b", args.layers, checkpoint)
    prompt = torch.randint(0, 49152, (64,), generator=torch.Generator().manual_seed(0))
    rows = []
    for rank in (0, args.rank):
        out = WORK / f"int4-b{args.block_size}-c{rank}-{args.layers}-layers"
        wall = export(checkpoint, out, rank, args.block_size)
        decoder = open_decoder(out)
        load_before = os.getloadavg()[0]
        speed = decode_speed(decoder, prompt)
        rows.append({"correction_rank": rank, "layers": args.layers, "block_size": args.block_size,
                     "disk_bytes": disk_bytes(onnx_file(out)), **node_counts(onnx_file(out)),
                     "decode_tokens_s": speed["decode_tokens_s"], "prefill_tokens_s": speed["prefill_tokens_s"],
                     "decode_s_runs": speed["decode_s_runs"], "export_wall_s": wall,
                     "load_avg": [load_before, os.getloadavg()[0]]})
        del decoder
        print(f"rank {rank}: decode {speed['decode_tokens_s']:.2f} tok/s, {rows[-1]['nodes']} nodes")
    base, corrected = rows
    record = {"command": command_line(), "measured_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "rows": rows, "decode_cost": 1 - corrected["decode_tokens_s"] / base["decode_tokens_s"]}
    STORE.write_text(json.dumps(record, indent=1))
    DOC.write_text(render(record))
    print(DOC.read_text())


def render(record: dict) -> str:
    lines = ["# `--correction-rank` at a 7B width: decode speed", "",
             "A Llama-2-7B-shaped checkpoint (hidden 4096, MLP 11008, 32 heads, vocabulary 49152; random weights) of "
             f"{record['rows'][0]['layers']} decoder layers, `--ratio 0 --quantize int4` (GPTQ, lm_head 4-bit) with "
             "and without the rank-R float corrections; ONNX Runtime CPU, 1 intra-op thread, 64-token prompt, 64 "
             "greedy steps, median of 3 after a warm-up (benchmarks/quality/front.py's loop). Made by:", "",
             f"    {record['command']}", "", f"Measured {record['measured_utc']}.", "",
             "| correction rank | block | disk MB | nodes | MatMulNBits | MatMul | decode tok/s | prefill tok/s | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['correction_rank']} | {r['block_size']} | {r['disk_bytes'] / 1e6:.1f} | {r['nodes']} "
                     f"| {r['MatMulNBits']} | {r['MatMul']} | {r['decode_tokens_s']:.2f} | {r['prefill_tokens_s']:.1f} "
                     f"| {r['load_avg'][0]:.2f}–{r['load_avg'][1]:.2f} |")
    lines += ["", f"Decode rate lost to the corrections: **{100 * record['decode_cost']:.1f} %** (at SmolLM2-135M's "
              "width: docs/results/front.md). `load`: the 1-minute load average before and after the row."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
