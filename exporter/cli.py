"""Command line: flags → one RunConfig → pipeline.run. Bad input: one clear line, non-zero exit."""
from __future__ import annotations

import logging
import signal
import sys

import click

from .config import ALLOCATIONS, METHODS, CalibrationConfig, CompressionConfig, EvalConfig, RunConfig


def sigterm_as_interrupt(signum, frame):
    """`docker stop`, `timeout` and batch schedulers send SIGTERM, whose default kills the process before any
    cleanup: unwind like Ctrl-C instead, so the temporary folders next to --out are removed."""
    raise KeyboardInterrupt


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--model", "-m", default="smollm2-135m", show_default=True,
              help="Alias (smollm2-135m, opt-6.7b, llama-2-7b, llama-3-8b, mistral-7b, qwen2.5-7b, ...), "
                   "hub id, local directory or .gguf file.")
@click.option("--ratio", "-r", type=float, default=None,
              help="Fraction of the compressed linears' parameters to remove (default 0.2).")
@click.option("--budget", default=None,
              help="Instead of --ratio: target size of all weights in the export dtype, e.g. 7GB, 500MB, 7GiB.")
@click.option("--method", type=click.Choice(METHODS), default="svd-llm-v2", show_default=True)
@click.option("--allocation", type=click.Choice(ALLOCATIONS), default=None,
              help="Rank allocation; default: the method's paper (v2 for svd-llm-v2, adacr for adasvd, else uniform).")
@click.option("--propagate", type=click.Choice(["original", "compressed"]), default=None,
              help="Calibration inputs of the next layer: through original or compressed layers "
                   "(default: compressed for adasvd, original otherwise).")
@click.option("--format", "formats", multiple=True, type=click.Choice(["safetensors", "onnx"]),
              default=("safetensors",), show_default=True, help="Artifact(s) to write; repeat for both.")
@click.option("--validate", "validations", multiple=True, type=click.Choice(["throughput"]),
              help="Extra validation of the ONNX export; repeat for several. throughput: ONNX Runtime tokens/s "
                   "dense vs compressed (CUDA when available, else CPU with small settings).")
@click.option("--out", "-o", default="svd-export-out", show_default=True, help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing, non-empty output folder.")
@click.option("--resume", is_flag=True,
              help="Continue a run that was killed, from its last finished layer (same options and --out); an "
                   "interrupted --resume run keeps its checkpoint for the next one.")
@click.option("--calib-data", default="wikitext2", show_default=True,
              help="'wikitext2' (hub), 'generated' (the model writes its own, offline), or a .txt/.raw/.jsonl path.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--calib-seqlen", type=click.IntRange(min=2), default=2048, show_default=True)
@click.option("--calib-batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-data", default="wikitext2", show_default=True,
              help="'wikitext2' (hub test split), 'generated', a file path, or 'none' to skip perplexity.")
@click.option("--eval-tokens", type=click.IntRange(min=2), default=None, help="Cap on evaluated tokens.")
@click.option("--eval-seqlen", type=click.IntRange(min=2), default=2048, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True,
              help="dtype the weights are written in; auto: the checkpoint's (float32 for a GGUF). ONNX graphs are "
                   "float32 or float16 (a bfloat16 model's graph is float16).")
@click.option("--device", default=None, help="cuda / cpu (default: cuda when available).")
@click.option("--min-rank", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--adacomp-iterations", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--adacomp-strength", type=click.FloatRange(0.0, 1.0), default=0.25, show_default=True,
              help="adaComp's target W(b X_orig + (1-b) X_compressed): 1 = full compensation (the paper's), "
                   "0 = none.")
@click.option("--min-retention", type=float, default=None,
              help="AdaSVD's mrr (adacr). Default: 0.4, capped at 0.75 x (1 - ratio).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (>= 18).")
@click.option("--skip-parity", is_flag=True,
              help="Skip the ONNX checks against PyTorch (logits parity, greedy tokens, ORT perplexity).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def main(model, ratio, budget, method, allocation, propagate, formats, validations, out, overwrite, resume, calib_data,
         calib_samples,
         calib_seqlen, calib_batch_size, seed, eval_data, eval_tokens, eval_seqlen, dtype, device, min_rank,
         adacomp_iterations, adacomp_strength, min_retention, opset, skip_parity, quiet):
    """Compress a causal LLM with SVD-based low-rank factorization and export the result."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    from .budget import parse_size
    from .pipeline import run  # heavy imports after argument parsing, so --help is instant

    try:
        if ratio is not None and budget is not None:
            raise ValueError("give either --ratio or --budget, not both")
        config = RunConfig(
            model=model, out=out, formats=tuple(dict.fromkeys(formats)), dtype=None if dtype == "auto" else dtype,
            device=device,
            validations=tuple(dict.fromkeys(validations)),
            compression=CompressionConfig(method=method, ratio=0.2 if ratio is None else ratio,
                                          budget_bytes=None if budget is None else parse_size(budget),
                                          allocation=allocation, propagate=propagate,
                                          min_rank=min_rank, adacomp_iterations=adacomp_iterations,
                                          adacomp_strength=adacomp_strength,
                                          min_retention=min_retention),
            calibration=CalibrationConfig(source=calib_data, samples=calib_samples, seqlen=calib_seqlen,
                                          seed=seed, batch_size=calib_batch_size),
            evaluation=None if eval_data == "none" else EvalConfig(eval_data, eval_tokens, eval_seqlen),
            opset=opset, parity=not skip_parity,
        )
        run(config, overwrite=overwrite, progress=not quiet, echo=click.echo, resume=resume)
    except KeyboardInterrupt:
        click.echo("svd-export: interrupted; nothing was written under the output name", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 — the CLI's one place that turns errors into one line
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        click.echo(f"svd-export: error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
