"""adaComp's strength β (target W(β X_o + (1 − β) X_c)) on SmolLM2-135M: perplexity per calibration size,
seed, ratio and β, beside SVD-LLM on the same calibration set; every other setting fixed (uniform
allocation, 1 iteration, adasvd propagating through the compressed layers). Writes
docs/results/adacomp-strength.md.

    python -m benchmarks.quality.adacomp_strength --seeds 0,1 --ratios 0.6 --strengths 0,0.25,0.5,1
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, calibration, command_line, smollm2, wiki_test_tokens
from exporter import CompressionConfig, compress_
from exporter.validate.perplexity import perplexity, torch_logits


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", default="0.6")
    p.add_argument("--strengths", default="0,0.25,0.5,1")
    p.add_argument("--calib-samples", default="16", help="comma-separated: one calibration set per value")
    p.add_argument("--seeds", default="0", help="comma-separated calibration seeds")
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--allocation", default="uniform")
    p.add_argument("--out", default=str(RESULTS / "adacomp-strength.md"))
    a = p.parse_args()
    command = command_line()

    model, tokenizer = smollm2()
    tokens = wiki_test_tokens(model, tokenizer, a.eval_tokens)
    rows = []
    for samples in [int(s) for s in a.calib_samples.split(",")]:
        for seed in [int(s) for s in a.seeds.split(",")]:
            batches = calibration(model, tokenizer, samples, a.calib_seqlen, seed=seed)
            for ratio in [float(r) for r in a.ratios.split(",")]:
                # the reference each strength is judged against: SVD-LLM, same calibration, same ranks
                runs = [("svd-llm", None)] + [("adasvd", float(b)) for b in a.strengths.split(",")]
                for method, strength in runs:
                    work = copy.deepcopy(model)
                    start = time.perf_counter()
                    config = CompressionConfig(method=method, ratio=ratio, allocation=a.allocation,
                                               adacomp_iterations=1, adacomp_strength=strength or 0.0)
                    result = compress_(work, batches, config, progress=False)
                    wall = time.perf_counter() - start
                    losses = result.extra.get("adacomp", {}).values()
                    gain = (sum(e["loss_after"] for e in losses) / sum(e["loss_before"] for e in losses)
                            if losses else float("nan"))  # guard: svd-llm has no adaComp entries
                    downs = f"{sum(e['down_steps_kept'] for e in losses)}/{len(losses)}" if losses else "-"
                    ppl = perplexity(torch_logits(work), tokens, a.window, progress=False)
                    label = method if strength is None else f"adasvd β={strength}"
                    rows.append((samples, seed, ratio, label, ppl, gain, downs, wall))
                    print(f"calib {samples}x{a.calib_seqlen} seed {seed} ratio {ratio} {label}: ppl {ppl:.2f} "
                          f"(paper objective x{gain:.3f}, down steps kept {downs}, {wall:.0f}s)", flush=True)
                    del work
    lines = ["# adaComp strength on SmolLM2-135M", "",
             f"Command (CPU): `{command}`. Compress times are inflated when other jobs shared the 2 cores.", "",
             f"`{a.allocation}` allocation, 1 adaComp iteration, calibration: samples × {a.calib_seqlen} tokens "
             f"of wiki.valid.tokens, perplexity on {tokens.numel() // a.window * a.window} tokens of wiki.test.raw "
             f"(window {a.window}). `objective` is Σ‖W'X_c − W X_o‖ (the paper's, summed over the matrices) after "
             "adaComp, relative to before it; `down steps kept` counts the matrices whose data-free down step",
             "lowered the blended objective (the others keep only the up step).", "",
             "| calibration samples | seed | ratio | method | perplexity | objective after / before | down steps kept | compress s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {s} | {r} | {m} | {p:.2f} | {'-' if math.isnan(g) else f'{g:.3f}'} | {d} | {w:.0f} |"
              for n, s, r, m, p, g, d, w in rows]
    Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
