"""Where ONNX Runtime's CPU decode time goes, per op type: SmolLM2-135M dense and compressed, fused and plain graph.

    OMP_NUM_THREADS=1 python -m benchmarks.speed.ort_profile

For each graph: one prefill of --prefill random tokens, then --decode single-token steps, with ORT's profiler on.
Per decoded token: the kernel time of each op type (the profiler's `*_kernel_time` events of the decode runs),
their sum, and the session's run time (`model_run`, which adds the executor's work between kernels). The time
outside the matmuls that read weights is all a better graph can remove: at batch 1 those read every weight
once, the same bytes in any graph of the same weights.

Compression: SVD-LLM V2 with uniform ranks (the same ranks at every matrix of a ratio) calibrated on
--calib-samples × --calib-seqlen tokens of wiki.valid.tokens. The profiler adds a little time per op; the
shares, not the absolute times, are the result. Writes docs/results/ort-profile-cpu.md.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, calibration, command_line, smollm2
from exporter import CompressionConfig, compress_
from exporter.onnx.fused import build_onnx
from exporter.onnx.plain import export_compressed, export_onnx
from exporter.validate.ort_session import OrtDecoder

MATMULS = {"MatMul", "Gemm", "MatMulNBits", "FusedMatMul"}
WEIGHTS = " × weights"  # suffix of a matmul op type whose node reads an initializer (the plain graph's attention
#                         products are MatMuls too, on activations only)


def weight_matmul_nodes(path: Path) -> set[str]:
    """Names of the graph's matmul nodes whose second input is an initializer, or a Transpose of one (the plain
    graph's tied lm_head: ORT folds it into a constant). The profiler's parameter_size cannot tell: a MatMul whose
    weight ORT pre-packed reports 0."""
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    weights |= {n.output[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights}
    return {n.name for n in graph.node if n.op_type in MATMULS and len(n.input) > 1 and n.input[1] in weights}


def profile_decode(path: Path, prefill: int, decode: int, threads: int) -> dict:
    """-> {"run_ms", "kernels_ms", "ops": {op type: (ms, count)}} per decoded token; a matmul node that reads
    weights (weight_matmul_nodes) counts as "<op> × weights"."""
    weight_nodes = weight_matmul_nodes(path)
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / "profile")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    decoder = OrtDecoder(session)
    rng = np.random.default_rng(0)
    _, past = decoder.prefill(rng.integers(0, 1000, (1, prefill)))
    for step in range(decode):
        _, past = decoder(rng.integers(0, 1000, (1, 1)), np.ones((1, prefill + step + 1)), past)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    if len(runs) != decode + 1:  # guard: the profile must hold the prefill and every decode step
        raise RuntimeError(f"{path}: {len(runs)} runs in the profile, expected {decode + 1}")
    start = runs[1]["ts"]  # the first decode step: the prefill's events are left out
    time_us, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            op = e["args"]["op_name"]
            if e["name"].removesuffix("_kernel_time") in weight_nodes:
                op += WEIGHTS
            time_us[op] += e["dur"]
            count[op] += 1
    return {"run_ms": sum(r["dur"] for r in runs[1:]) / decode / 1e3,
            "kernels_ms": sum(time_us.values()) / decode / 1e3,
            "ops": {op: (us / decode / 1e3, count[op] // decode) for op, us in time_us.most_common()}}


def write_markdown(rows: dict[str, dict], meta: dict) -> None:
    text = ["# Where ORT CPU decode time goes (SmolLM2-135M, per decoded token)", "",
            "Made by:", "", f"    {meta['command']}", "",
            f"ONNX Runtime {meta['onnxruntime']}, CPUExecutionProvider with {meta['threads']} intra-op thread(s), "
            f"{meta['date']}; batch 1, prefill {meta['prefill']}, {meta['decode']} decode steps profiled. Compression: "
            f"SVD-LLM V2, uniform ranks, {meta['calib']} calibration tokens. The profiler's own cost is in every "
            "number: compare shares, not times with docs/results/throughput-cpu.md.", "",
            "- **matmul share**: kernel time of the matmuls that read weights (MatMul, Gemm: the tied lm_head) over "
            "the session's run time; the plain graph's attention products (MatMul on activations) are not in it.",
            "- **run / matmul**: run time / matmul time. At batch 1 the matmuls read the same weights in any graph "
            "of these weights, so a graph that removed every other op could be this much faster and no more. The "
            "profiler costs time per node run, so the plain graph (about 5× the nodes) looks slower here than "
            "it runs: fused / plain decode without the profiler is in docs/results/throughput-cpu.md.", "",
            "| graph | run ms/token | kernels ms | matmul ms | matmul share | run / matmul | nodes run / token |",
            "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        matmul = sum(ms for op, (ms, _) in r["ops"].items() if op.endswith(WEIGHTS))
        nodes = sum(n for _, n in r["ops"].values())
        if matmul <= 0:  # guard: a profile without weight matmuls is not a decoder's
            raise RuntimeError(f"{label}: no matmul reading weights in the profile")
        text.append(f"| {label} | {r['run_ms']:.2f} | {r['kernels_ms']:.2f} | {matmul:.2f} | "
                    f"{matmul / r['run_ms']:.3f} | ×{r['run_ms'] / matmul:.2f} | {nodes} |")
    text += ["", "Per op type (ms per token, nodes per token):", ""]
    for label, r in rows.items():
        parts = ", ".join(f"{op} {ms:.2f} ({n})" for op, (ms, n) in r["ops"].items() if ms >= 0.01)
        text.append(f"- **{label}**: {parts}")
    (RESULTS / "ort-profile-cpu.md").write_text("\n".join(text) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", default="0.4,0.8")
    p.add_argument("--prefill", type=int, default=32)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=256)
    args = p.parse_args()
    if args.decode < 1 or args.prefill < 1:  # the per-token times divide by the decode steps
        p.error("--prefill and --decode must be at least 1")
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    model, tokenizer = smollm2()
    batches = calibration(model, tokenizer, args.calib_samples, args.calib_seqlen)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as work:
        work = Path(work)
        dense_plain = export_onnx(model, tokenizer, work / "dense-plain", "float32")
        rows["dense, fused"] = profile_decode(build_onnx(model, tokenizer, work / "dense"), args.prefill,
                                              args.decode, threads)
        rows["dense, plain"] = profile_decode(dense_plain, args.prefill, args.decode, threads)
        for ratio in (float(r) for r in args.ratios.split(",")):
            compressed = copy.deepcopy(model)
            compress_(compressed, batches, CompressionConfig(method="svd-llm-v2", ratio=ratio, allocation="uniform"),
                      progress=False)
            fused = build_onnx(compressed, tokenizer, work / f"fused-{ratio}")
            plain, _ = export_compressed(dense_plain, compressed, work / f"plain-{ratio}")
            rows[f"{ratio}, fused"] = profile_decode(fused, args.prefill, args.decode, threads)
            rows[f"{ratio}, plain"] = profile_decode(plain, args.prefill, args.decode, threads)
            del compressed
    for label, r in rows.items():
        print(f"{label:14s} run {r['run_ms']:.2f} ms/token, kernels {r['kernels_ms']:.2f}", flush=True)
    import onnxruntime
    meta = {"command": command_line(), "onnxruntime": onnxruntime.__version__, "threads": threads,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "prefill": args.prefill,
            "decode": args.decode, "calib": f"{args.calib_samples}×{args.calib_seqlen}"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_markdown(rows, meta)
    print(f"wrote {RESULTS / 'ort-profile-cpu.md'}")


if __name__ == "__main__":
    main()
