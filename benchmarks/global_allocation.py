"""Global rank allocation (both weights) against uniform on one model: same calibration and evaluation tokens
for every run, one process. Prints a markdown table, writes it to docs/results/global-allocation.md and
every run's rank plan to --plans (JSON) for the report/heat maps.

    PYTHONPATH=$PWD python3 benchmarks/global_allocation.py --ratio 0.4 --ratio 0.6
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import click

from exporter import compress
from exporter.calibration.data import calibration_batches, evaluation_tokens
from exporter.compress import compress_
from exporter.config import CompressionConfig
from exporter.models import load
from exporter.validate.perplexity import model_window, perplexity, torch_logits

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def computed_once(fn):
    """Every run starts from the same dense model and calibration batches, so the profile (spectra) and the
    gradient sensitivity are identical across runs: compute each once per process."""
    cache = {}

    def once(*args, **kwargs):
        if "value" not in cache:
            cache["value"] = fn(*args, **kwargs)
        return copy.deepcopy(cache["value"])
    return once


def kind_summary(result) -> str:
    """Mean rank per matrix type as a fraction of its break-even rank (dense counts as 1)."""
    parts = []
    for kind in dict.fromkeys(m.kind for m in result.matrices):
        group = [m for m in result.matrices if m.kind == kind]
        fractions = [result.plan[m.name] * m.params_per_rank / m.dense_params if m.name in result.plan else 1.0
                     for m in group]
        parts.append(f"{kind} {sum(fractions) / len(fractions):.2f}")
    return ", ".join(parts)


@click.command()
@click.option("--model", default="smollm2-135m")
@click.option("--method", default="svd-llm-v2")
@click.option("--ratio", "ratios", type=float, multiple=True, default=(0.4,))
@click.option("--allocation", "allocations", multiple=True, default=("uniform", "global-relative", "global-fisher"))
@click.option("--min-rank", type=int, default=1)
@click.option("--calib", default=str(DATA / "wiki.valid.tokens"))
@click.option("--calib-samples", type=int, default=16)
@click.option("--calib-seqlen", type=int, default=256)
@click.option("--eval", "eval_source", default=str(DATA / "wiki.test.raw"))
@click.option("--eval-tokens", type=int, default=16384)
@click.option("--out", default="docs/results/global-allocation.md")
@click.option("--plans", default="/tmp/global-allocation-plans.json")
@click.option("--dense-ppl/--no-dense-ppl", default=True, help="Also measure the dense model (one more evaluation).")
def main(model, method, ratios, allocations, min_rank, calib, calib_samples, calib_seqlen, eval_source,
         eval_tokens, out, plans, dense_ppl):
    compress.profile_model = computed_once(compress.profile_model)
    compress.output_gradient_sensitivity = computed_once(compress.output_gradient_sensitivity)
    dense, tokenizer, _ = load(model, device="cpu")
    window = model_window(dense, 2048)
    eval_ids = evaluation_tokens(dense, tokenizer, eval_source, eval_tokens, window)
    batches = calibration_batches(dense, tokenizer, calib, calib_samples, calib_seqlen, seed=0)
    dense_ppl = perplexity(torch_logits(dense), eval_ids, window, "dense") if dense_ppl else None
    rows, saved = [], {}
    for ratio in ratios:
        for alloc in allocations:
            model_copy = copy.deepcopy(dense)
            start = time.perf_counter()
            config = CompressionConfig(method=method, ratio=ratio, allocation=alloc, min_rank=min_rank)
            result = compress_(model_copy, batches, config, progress=False)
            seconds = time.perf_counter() - start
            ppl = perplexity(torch_logits(model_copy), eval_ids, window, f"{alloc} @{ratio}")
            linears, after = result.linear_params()
            rows.append((ratio, alloc, ppl, 1 - after / linears, len(result.matrices) - len(result.plan), seconds,
                         kind_summary(result)))
            saved[f"{alloc}@{ratio}"] = result.plan
            Path(plans).write_text(json.dumps(saved, indent=1))
            print(f"{alloc} @{ratio}: ppl {ppl:.3f} ({seconds:.0f}s) {kind_summary(result)}", flush=True)
            del model_copy

    command = "PYTHONPATH=$PWD python3 " + " ".join(sys.argv)
    lines = [f"# Global rank allocation vs uniform — {model}, {method}", "",
             f"Command: `{command}`", "",
             f"Calibration: {calib_samples} × {calib_seqlen} tokens of `{Path(calib).name}` (seed 0); evaluation: "
             f"{eval_ids.numel() // window * window} tokens of `{Path(eval_source).name}`, window {window}; "
             f"min rank {min_rank}." + (f" Dense perplexity {dense_ppl:.3f}." if dense_ppl else ""), "",
             "| ratio | allocation | perplexity | realised ratio | dense linears | compress s | "
             "mean rank / break-even per type |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r} | {a} | {p:.2f} | {q:.4f} | {d} | {s:.0f} | {k} |" for r, a, p, q, d, s, k in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)


if __name__ == "__main__":
    main()
