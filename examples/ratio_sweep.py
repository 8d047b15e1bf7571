"""Compress one model at several ratios and tabulate perplexity, realised ratio and (with --throughput)
ONNX Runtime decode tokens/s: one svd-export run per ratio, each into OUT/ratio-<r>/.

    python examples/ratio_sweep.py --model smollm2-135m --ratios 0.2 0.4 0.6 --out sweep \
        --calib-samples 32 --calib-seqlen 512 --eval-tokens 32768

Writes OUT/sweep.md and OUT/sweep.png from the runs' report.json files."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from exporter.config import CalibrationConfig, CompressionConfig, EvalConfig, RunConfig
from exporter.run import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="svd-llm-v2")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--out", type=Path, default=Path("sweep"))
    parser.add_argument("--calib-data", default="wikitext2")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-data", default="wikitext2")
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--throughput", action="store_true", help="also export ONNX and measure tokens/s")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    reports = {}
    for ratio in args.ratios:
        folder = args.out / f"ratio-{ratio:g}"
        if (folder / "report.json").is_file():  # a finished run is reused: rerun after deleting its folder
            reports[ratio] = json.loads((folder / "report.json").read_text())
            continue
        config = RunConfig(
            model=args.model, out=str(folder), device=args.device,
            formats=("safetensors", "onnx") if args.throughput else ("safetensors",),
            validations=("throughput",) if args.throughput else (),
            compression=CompressionConfig(method=args.method, ratio=ratio),
            calibration=CalibrationConfig(source=args.calib_data, samples=args.calib_samples, seqlen=args.calib_seqlen),
            evaluation=EvalConfig(args.eval_data, args.eval_tokens, args.eval_seqlen))
        reports[ratio] = run(config)

    lines = [f"# Ratio sweep: {args.model}, {args.method}", "",
             "| ratio | realised (linears) | perplexity dense | perplexity compressed | ORT decode tok/s dense | "
             "ORT decode tok/s compressed | decode speedup | bound |", "|---|---|---|---|---|---|---|---|"]
    for ratio, report in reports.items():
        ppl, t = report.get("perplexity") or {}, report.get("throughput")
        speed = ([f"{t['dense']['decode_tokens_s']:.1f}", f"{t['compressed']['decode_tokens_s']:.1f}",
                  f"{t['speedup_decode']:.3f}", f"{t['bound_decode_speedup']:.3f}"] if t else ["–"] * 4)
        lines.append("| " + " | ".join([f"{ratio:g}", f"{report['ratio']['realized_linears']:.4f}",
                                         f"{ppl.get('dense', float('nan')):.3f}",
                                         f"{ppl.get('compressed', float('nan')):.3f}", *speed]) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 4))
    ratios = list(reports)
    ax.plot(ratios, [reports[r]["perplexity"]["compressed"] for r in ratios], "o-", label="compressed")
    ax.axhline(reports[ratios[0]]["perplexity"]["dense"], color="grey", linestyle="--", label="dense")
    ax.set_xlabel("ratio (fraction of the linears' parameters removed)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "sweep.png", dpi=110)
    print("\n".join(lines))
    print(f"wrote {args.out / 'sweep.md'} and {args.out / 'sweep.png'}")


if __name__ == "__main__":
    main()
