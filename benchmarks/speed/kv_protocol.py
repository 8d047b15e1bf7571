"""The two KV protocols of the decode loop on ORT CPU (exporter/validate/throughput.py): the fused graph's KV
buffer shared by past and present (static decode shapes: what onnxruntime-genai runs and what CUDA graphs
need) against two buffers used in turn (past read from one, present written whole into the other each step).
SmolLM2-135M fused graphs, dense and compressed at --ratios (SVD-LLM V2, uniform ranks), float32.

    OMP_NUM_THREADS=1 python -m benchmarks.speed.kv_protocol

Every graph and loop is opened once; then --rounds interleaved rounds each time every (graph, protocol) once,
so a change of the shared machine's speed falls on all of them alike. Per graph: decode tokens/s of each
protocol (medians over the rounds) and the median over the rounds of shared / alternating; per protocol, the
compressed graph's speedup over dense (median of the per-round ratios). Writes docs/results/kv-protocol-cpu.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.common import RESULTS, calibration, command_line, smollm2
from exporter import CompressionConfig, compress_
from exporter.onnx.fused import build_onnx
from exporter.validate.providers import CPU, open_session
from exporter.validate.throughput import (
    OrtDecodeLoop,
    ThroughputSettings,
    folder_config,
    rates,
    read_signature,
    shares_kv_buffer,
)

PROTOCOLS = {"shared": True, "alternating": False}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", default="0.4,0.8")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefill", type=int, default=32)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--out", default=str(RESULTS / "kv-protocol-cpu.md"))
    args = p.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    command = command_line()
    model, tokenizer = smollm2()
    batches = calibration(model, tokenizer, args.calib_samples, args.calib_seqlen)
    work = Path(tempfile.mkdtemp(prefix="kv-protocol-"))
    graphs = {"dense": build_onnx(model, tokenizer, work / "dense", "float32")}
    for ratio in (float(r) for r in args.ratios.split(",")):
        compressed = copy.deepcopy(model)
        compress_(compressed, batches, CompressionConfig(method="svd-llm-v2", ratio=ratio, allocation="uniform"),
                  progress=False)
        graphs[f"{ratio:g}"] = build_onnx(compressed, tokenizer, work / f"r{ratio:g}", "float32")
        del compressed
    settings = ThroughputSettings(batch=args.batch, prefill=args.prefill, decode=args.decode, warmup=1, repeats=1,
                                  threads=threads)
    loops = {}
    for label, path in graphs.items():
        if not shares_kv_buffer(path.parent):
            raise RuntimeError(f"the fused graph {path} does not declare a shared KV buffer")
        session = open_session(path, CPU, threads=threads)
        signature = read_signature(session, folder_config(path.parent))
        for protocol, shared in PROTOCOLS.items():
            loops[label, protocol] = OrtDecodeLoop(session, signature, CPU, settings, shared_kv=shared)
            loops[label, protocol].run_once()  # warm-up
    tokens_s = {key: [] for key in loops}
    for index in range(args.rounds):
        for key, loop in loops.items():
            tokens_s[key].append(rates([loop.run_once()], settings, None)["decode_tokens_s"])
        print(index, " ".join(f"{k[0]}/{k[1]} {v[-1]:.1f}" for k, v in tokens_s.items()),
              f"load {os.getloadavg()[0]:.2f}", flush=True)

    def ratio(a, b) -> tuple[float, float, float]:
        per_round = [x / y for x, y in zip(tokens_s[a], tokens_s[b])]
        return statistics.median(per_round), min(per_round), max(per_round)

    lines = ["# Decode KV protocols on ONNX Runtime CPU (SmolLM2-135M, fused graphs)", "", "Made by:", "",
             f"    {command}", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; batch {args.batch}, prefill {args.prefill}, "
             f"decode {args.decode}, {args.rounds} interleaved rounds, {threads} thread(s); compression SVD-LLM V2, "
             f"uniform ranks, {args.calib_samples}×{args.calib_seqlen} calibration tokens.", "",
             "| graph | shared tok/s | alternating tok/s | shared / alternating (min–max over rounds) | "
             "speedup over dense, shared | speedup over dense, alternating |", "|---|---|---|---|---|---|"]
    for label in graphs:
        own = ratio((label, "shared"), (label, "alternating"))
        ups = [ratio((label, p), ("dense", p))[0] for p in PROTOCOLS]
        lines.append(f"| {label} | {statistics.median(tokens_s[label, 'shared']):.2f} | "
                     f"{statistics.median(tokens_s[label, 'alternating']):.2f} | {own[0]:.3f} ({own[1]:.3f}–{own[2]:.3f}) | "
                     f"{ups[0]:.3f} | {ups[1]:.3f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    del loops
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
