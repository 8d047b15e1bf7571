"""adaCR's importance orientation, measured: 1 − cos (a layer that changes its input more keeps more) vs
cos (the paper's formula as written), with uniform ratios as the reference. Same model, calibration and
evaluation tokens for every run; prints a markdown table and writes it to docs/results/adacr-importance.md.

    python -m benchmarks.quality.adacr_importance --ratio 0.4
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import time
from pathlib import Path

import click

from benchmarks.common import WIKITEXT, command_line
from exporter import plan as allocation
from exporter.config import CompressionConfig
from exporter.data.windows import calibration_batches, evaluation_tokens
from exporter.load.open import load
from exporter.loop.compress import compress_
from exporter.validate.perplexity import model_window, perplexity, torch_logits


@click.command()
@click.option("--model", default="smollm2-135m")
@click.option("--method", default="adasvd")
@click.option("--ratio", type=float, default=0.4)
@click.option("--min-retention", type=float, default=0.4)
@click.option("--calib", default=str(WIKITEXT / "wiki.valid.tokens"))
@click.option("--calib-samples", type=int, default=16)
@click.option("--calib-seqlen", type=int, default=256)
@click.option("--eval", "eval_source", default=str(WIKITEXT / "wiki.test.raw"))
@click.option("--eval-tokens", type=int, default=16384)
@click.option("--variants", default="uniform,1-cos,cos", show_default=True, help="Comma-separated subset.")
@click.option("--dense/--no-dense", "dense_ppl", default=True, help="Also evaluate the dense model.")
@click.option("--out", default="docs/results/adacr-importance.md")
def main(model, method, ratio, min_retention, calib, calib_samples, calib_seqlen, eval_source, eval_tokens, variants,
         dense_ppl, out):
    dense, tokenizer, _ = load(model, device="cpu")
    window = model_window(dense, 2048)
    eval_ids = evaluation_tokens(dense, tokenizer, eval_source, eval_tokens, window)
    batches = calibration_batches(dense, tokenizer, calib, calib_samples, calib_seqlen, seed=0)
    adacr = allocation.ALLOCATORS["adacr"]
    rows = [("dense", "-", perplexity(torch_logits(dense), eval_ids, window, "dense"), 0.0, [])] if dense_ppl else []
    chosen = variants.split(",")
    for label, alloc, importance in [("uniform", "uniform", None), ("adacr, importance 1 - cos", "adacr", "1-cos"),
                                     ("adacr, importance cos", "adacr", "cos")]:
        if (importance or alloc) not in chosen:
            continue
        if importance:
            allocation.ALLOCATORS["adacr"] = dataclasses.replace(adacr, fn=functools.partial(adacr.fn, importance=importance))
        model_copy = copy.deepcopy(dense)
        start = time.perf_counter()
        result = compress_(model_copy, batches, CompressionConfig(method=method, ratio=ratio, allocation=alloc,
                                                                  min_retention=min_retention), progress=False)
        seconds = time.perf_counter() - start
        ppl = perplexity(torch_logits(model_copy), eval_ids, window, label)
        rows.append((label, alloc, ppl, seconds, result.layer_ratios()))
        print(f"{label}: ppl {ppl:.3f}", flush=True)
        del model_copy
    allocation.ALLOCATORS["adacr"] = adacr

    command = command_line()
    lines = [f"# adaCR importance: {model}, {method}, ratio {ratio}, min retention {min_retention}", "",
             f"Command: `{command}`", "",
             f"Calibration {calib_samples} x {calib_seqlen} tokens from `{Path(calib).name}`, perplexity on "
             f"{eval_ids.numel() // window * window} tokens of `{Path(eval_source).name}` (window {window}).", "",
             "| variant | perplexity | compress s | per-layer ratio (first, min, max, last) |", "|---|---|---|---|"]
    for label, _, ppl, seconds, ratios in rows:
        spread = (f"{ratios[0]:.3f}, {min(ratios):.3f}, {max(ratios):.3f}, {ratios[-1]:.3f}" if ratios else "-")
        lines.append(f"| {label} | {ppl:.3f} | {seconds:.0f} | {spread} |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)


if __name__ == "__main__":
    main()
