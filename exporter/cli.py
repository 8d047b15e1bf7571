"""Command line: flags → one RunConfig → run.run. Bad input: one line `svd-export: error: …`, exit 1
(--debug adds the traceback). The run holds the output name's lock from start to end and runs in a worker
thread, so SIGTERM (143) and SIGINT (130) are honoured at once and leave nothing beside --out."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import traceback

import click

from .config import (
    ALLOCATIONS,
    DEFAULT_BLOCK_SIZE,
    E2E_PARALLEL,
    METHODS,
    ONNX_GRAPHS,
    QUANTIZE_CHOICES,
    QUANTIZERS,
    REFINES,
    SCHEDULES,
    CalibrationConfig,
    CompressionConfig,
    EvalConfig,
    Quantization,
    RunConfig,
)

DEFAULT_OPSET = 18
E2E_FLAGS = frozenset({"e2e_data", "e2e_samples", "e2e_seqlen", "e2e_steps", "e2e_lr", "e2e_schedule", "e2e_parallel"})


def quiet_libraries() -> None:
    """-q: no progress bar from anyone (our tqdm bars, transformers', huggingface_hub's)."""
    os.environ["TQDM_DISABLE"] = "1"  # read by tqdm at import: covers every bar not given disable=
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def disk_full(exc: BaseException | None) -> bool:
    """ENOSPC/EDQUOT anywhere in the cause chain; safetensors' Rust writer reports it as text only."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "os error 28" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def one_line(exc: BaseException, out: str) -> str:
    """The error as one line naming what is at fault."""
    if disk_full(exc):
        return f"no space left on the device of --out {out} (nothing was written under the output name)"
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 400 else text[:397] + "..."


def compression_config(method: str | None, ratio: float, calibration_batches: int, **given) -> CompressionConfig:
    """No --method: the default recipe of the ratio and calibration size (exporter/recipe.py); a --method: that
    method's paper recipe. Options the user gave (not None) override either."""
    from .recipe import default_compression
    fields = default_compression(ratio, calibration_batches) if method is None else {"method": method}
    return CompressionConfig(**{**fields, "ratio": ratio, **{k: v for k, v in given.items() if v is not None}})


class OneLineUsageError(click.UsageError):
    def show(self, file=None) -> None:
        click.echo(f"svd-export: error: {self.format_message()} (svd-export --help lists the options)", err=True)


class Command(click.Command):
    """Usage errors (unknown option, bad value) as one line too, exit 2 as click's."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise OneLineUsageError(" ".join(exc.format_message().split()), exc.ctx) from exc


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--model", "-m", default="smollm2-135m", show_default=True,
              help="Alias (smollm2-135m, opt-6.7b, llama-2-7b, llama-3-8b, mistral-7b, qwen2.5-7b, ...), "
                   "hub id, local directory or .gguf file.")
@click.option("--ratio", "-r", type=float, default=None,
              help="Fraction of the compressed linears' parameters to remove, in (0, 1) (default 0.2).")
@click.option("--budget", default=None,
              help="Instead of --ratio: target size of all weights in the export dtype, e.g. 7GB, 500MB, 7GiB.")
@click.option("--method", type=click.Choice(METHODS), default=None,
              help="Factorization: svd, asvd, fwsvd, svd-llm, svd-llm-v2 (SVD-LLM V2), adasvd (AdaSVD). Default: the "
                   "default recipe (exporter/recipe.py: adasvd with the global-fisher allocation up to ratio 0.6, "
                   "adacr above, then --refine block); a method "
                   "given runs its paper's recipe.")
@click.option("--allocation", type=click.Choice(ALLOCATIONS), default=None,
              help="Rank allocation; default: the recipe's, or the method's paper (v2 for svd-llm-v2, adacr for "
                   "adasvd, else uniform).")
@click.option("--refine", type=click.Choice(REFINES), default=None,
              help="block: after each layer's closed form, Adam on its factors towards the dense layer's output; e2e: "
                   "after the last layer, Adam on all factors towards the dense model's logits (KL; the whole "
                   "compressed model on the device); block+e2e: both (default recipe: block+e2e where its memory "
                   "formula fits the device and its windows are 256 tokens long at least, else block; none with --method).")
@click.option("--refine-steps", type=click.IntRange(min=0), default=None,
              help="--refine only: Adam steps (per layer for block, in all for e2e), one calibration batch each "
                   "(early stopping on held-out batches; default 64).")
@click.option("--refine-lr", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="--refine only: step size, relative to each factor's RMS (default 0.001).")
@click.option("--e2e-data", default=None,
              help="--refine e2e only: the text end-to-end refinement trains on: 'wikitext2', 'generated' (the dense "
                   "model writes it: data-free distillation, measured worse than real text) or a file (default: the "
                   "calibration batches).")
@click.option("--e2e-samples", type=click.IntRange(min=2), default=None,
              help="--refine e2e only: sequences for end-to-end refinement, 1/8 held out for early stopping "
                   "(default: --calib-samples; the default recipe's own e2e: 256 at least).")
@click.option("--e2e-seqlen", type=click.IntRange(min=2), default=None,
              help="--refine e2e only: tokens per end-to-end sequence (default: --calib-seqlen).")
@click.option("--e2e-steps", type=click.IntRange(min=0), default=None,
              help="--refine e2e only: Adam steps of end-to-end refinement (default: --refine-steps; the default "
                   "recipe's own e2e: one pass over its training batches, --refine-steps at least).")
@click.option("--e2e-lr", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="--refine e2e only: step size of end-to-end refinement, relative to each factor's RMS "
                   "(default: --refine-lr).")
@click.option("--e2e-schedule", type=click.Choice(SCHEDULES), default=None,
              help="--refine e2e only: step sizes of end-to-end refinement: constant (default) or cosine (a linear "
                   "warm-up over the first 1/8 of --e2e-steps, then a cosine decay to 0).")
@click.option("--e2e-parallel", type=click.Choice(E2E_PARALLEL), default=None,
              help="--refine e2e under torchrun only: ddp (every process holds the whole compressed model and its "
                   "optimizer state), fsdp (FSDP2: each decoder layer sharded over the processes), fsdp-offload (the "
                   "same, its shards, gradients and optimizer state in host memory) or auto (default: the first of "
                   "these that its memory formula fits on the device).")
@click.option("--keep-dense-above", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="A matrix whose planned rank keeps at least this share of its parameters stays dense; its budget "
                   "goes to the others (default: 0.9 in the default recipe, 1 = off with --method).")
@click.option("--propagate", type=click.Choice(["original", "compressed"]), default=None,
              help="Calibration inputs of the next layer: through original or compressed layers "
                   "(default: compressed for adasvd, original otherwise).")
@click.option("--format", "formats", multiple=True, type=click.Choice(["safetensors", "onnx"]),
              default=("safetensors",), show_default=True, help="Artifact(s) to write; repeat for both.")
@click.option("--validate", "validations", multiple=True, type=click.Choice(["throughput"]),
              help="Extra validation of the ONNX export; repeat for several. throughput: ONNX Runtime tokens/s "
                   "dense vs compressed (CUDA when available, else CPU with small settings).")
@click.option("--out", "-o", default="svd-export-out", show_default=True,
              help="Output folder: written beside it, renamed into place at the end; one run per name at a time.")
@click.option("--overwrite", is_flag=True, help="Replace an existing, non-empty output folder.")
@click.option("--resume", is_flag=True,
              help="Continue a run that was killed, from its last finished layer (same options and --out); an "
                   "interrupted --resume run keeps its checkpoint for the next one.")
@click.option("--calib-data", default="wikitext2", show_default=True,
              help="'wikitext2' (hub), 'generated' (the model writes its own, offline), or a .txt/.raw/.jsonl path.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Number of calibration sequences.")
@click.option("--calib-seqlen", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Tokens per calibration sequence (at most the model's positions).")
@click.option("--calib-batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Calibration sequences per forward pass.")
@click.option("--calib-overlap", is_flag=True,
              help="Allow overlapping calibration windows when the text has fewer tokens than samples x seqlen "
                   "(otherwise an error).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the calibration windows and of generated text.")
@click.option("--eval-data", default="wikitext2", show_default=True,
              help="'wikitext2' (hub test split), 'generated', a file path, or 'none' to skip perplexity.")
@click.option("--eval-tokens", type=click.IntRange(min=2), default=None,
              help="Cap on evaluated tokens (default: the whole split; generated: 16 windows).")
@click.option("--eval-seqlen", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Perplexity window in tokens (capped at the model's positions).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True,
              help="Dtype the weights are written in; auto: the checkpoint's (float32 for a GGUF). ONNX graphs are "
                   "float32 or float16 (a bfloat16 model's graph is float16).")
@click.option("--device", default=None, help="cuda / cpu (default: cuda when available).")
@click.option("--min-rank", type=click.IntRange(min=1), default=1, show_default=True,
              help="Smallest rank any compressed matrix gets.")
@click.option("--adacomp-iterations", type=click.IntRange(min=0), default=None,
              help="adasvd only: adaComp's up steps, with a damped exact down step between two (default 1).")
@click.option("--adacomp-strength", type=click.FloatRange(0.0, 1.0), default=None,
              help="adasvd only: adaComp's target W(b X_orig + (1-b) X_compressed): 1 = full compensation "
                   "(the paper's), 0 = none (default: the recipe's).")
@click.option("--adacomp-damping", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="adasvd only: damping of adaComp's down step, relative to the mean eigenvalue of X Xᵀ.")
@click.option("--min-retention", type=float, default=None,
              help="adacr only: AdaSVD's mrr. Default: 0.4, capped at 0.75 x (1 - ratio).")
@click.option("--opset", type=int, default=None,
              help=f"--format onnx only: ONNX opset, >= 18 and supported by ONNX Runtime (default {DEFAULT_OPSET}).")
@click.option("--onnx-graph", type=click.Choice(ONNX_GRAPHS), default="auto", show_default=True,
              help="--format onnx only. fused: the decoder written from the weights with ONNX Runtime's fused ops "
                   "(GroupQueryAttention, SkipLayerNorm), one layer at a time (Llama, Mistral, Qwen2/3, OPT); plain: "
                   "torch.onnx dynamo export + low-rank rewrite (any family); auto: fused where it can be.")
@click.option("--quantize", type=click.Choice(["none", *QUANTIZE_CHOICES]), default="none", show_default=True,
              help="--format onnx only: weights of every matmul (both factors of each low-rank pair, dense linears, "
                   "lm_head) as ONNX Runtime's MatMulNBits, quantized per weight as the graph is written (fused graph).")
@click.option("--quantizer", type=click.Choice(QUANTIZERS), default="gptq", show_default=True,
              help="--quantize: gptq puts every linear of each layer on the int grid in the layer loop (GPTQ with "
                   "its inputs' X Xᵀ; a low-rank pair's up refitted to its rounded down); nearest rounds each weight "
                   "to nearest as the graph is written (ONNX Runtime's block quantizer).")
@click.option("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, show_default=True,
              help="--quantize block size along each weight's input dimension (a power of two >= 16).")
@click.option("--refine-rounded/--refine-float", default=False, show_default=True,
              help="--quantize gptq with --refine block: refinement optimises the factors through their rounding "
                   "(straight-through), or in float before GPTQ rounds them.")
@click.option("--head-bits", type=click.Choice(["4", "8"]), default=None, callback=lambda _c, _p, v: v and int(v),
              help="--quantize: bits of the lm_head (and of the embedding table the graph packs with it). "
                   "[default: --quantize's bits]")
@click.option("--correction-rank", type=click.IntRange(min=0), default=0, show_default=True,
              help="--quantize with --quantizer gptq: beside every dense decoder linear's MatMulNBits, a float rank-r "
                   "pair holding the best rank-r part of its rounding error (W - Q(W), weighted by its inputs' "
                   "X Xᵀ); 0 = none.")
@click.option("--rank-multiple", type=click.IntRange(min=1), default=1, show_default=True,
              help="Round every rank to a multiple of N (kernel tiles, quantization blocks); the budget stays met.")
@click.option("--skip-parity", is_flag=True,
              help="--format onnx only: skip the ONNX checks against PyTorch (logits parity, greedy tokens, "
                   "ORT perplexity).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars (ours and the libraries').")
@click.option("--debug", is_flag=True, help="On error, print the traceback too.")
@click.pass_context
def main(ctx, model, ratio, budget, method, allocation, refine, refine_steps, refine_lr, e2e_data, e2e_samples,
         e2e_seqlen, e2e_steps, e2e_lr, e2e_schedule, e2e_parallel, keep_dense_above, propagate,
         formats, validations, out, overwrite, resume, calib_data, calib_samples, calib_seqlen, calib_batch_size,
         calib_overlap, seed, eval_data, eval_tokens, eval_seqlen, dtype, device, min_rank, adacomp_iterations,
         adacomp_strength, adacomp_damping, min_retention, opset, onnx_graph, quantize, quantizer, block_size,
         refine_rounded, head_bits, correction_rank, rank_multiple, skip_parity, quiet, debug):
    """Compress a causal LLM with SVD-based low-rank factorization and export the result."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if debug:
        logging.getLogger("exporter").setLevel(logging.DEBUG)
    given = {name for name in ctx.params
             if ctx.get_parameter_source(name) in (click.core.ParameterSource.COMMANDLINE,
                                                   click.core.ParameterSource.ENVIRONMENT)}
    try:
        if quiet:
            quiet_libraries()
        from .output import folder as output_dir
        from .output import signals
        from .plan.budget import parse_size
        from .preflight import check_flags_apply
        from .recipe import e2e_data as e2e_data_of
        from .run import run

        if ratio is not None and budget is not None:
            raise ValueError("give either --ratio or --budget, not both")
        calibration = CalibrationConfig(source=calib_data, samples=calib_samples, seqlen=calib_seqlen, seed=seed,
                                        batch_size=calib_batch_size, allow_overlap=calib_overlap)
        default_e2e = method is None and refine is None and bool(given & E2E_FLAGS)
        if default_e2e:  # the default recipe with end-to-end settings given: its own e2e, with them
            refine = "block+e2e"
        config = RunConfig(
            model=model, out=out, formats=tuple(dict.fromkeys(formats)), dtype=None if dtype == "auto" else dtype,
            device=device,
            validations=tuple(dict.fromkeys(validations)),
            compression=compression_config(
                method, 0.2 if ratio is None else ratio, -(-calib_samples // calib_batch_size),
                budget_bytes=None if budget is None else parse_size(budget),
                allocation=allocation, propagate=propagate, refine=refine, refine_steps=refine_steps,
                refine_lr=refine_lr, keep_dense_above=keep_dense_above, min_rank=min_rank, rank_multiple=rank_multiple,
                adacomp_iterations=adacomp_iterations, adacomp_strength=adacomp_strength,
                adacomp_damping=adacomp_damping, min_retention=min_retention,
                quantization=Quantization.parse(quantize, block_size, head_bits) if quantizer == "gptq" else None,
                refine_rounded=refine_rounded, e2e_steps=e2e_steps, e2e_lr=e2e_lr, e2e_schedule=e2e_schedule,
                e2e_parallel=e2e_parallel,
                correction_rank=correction_rank),
            calibration=calibration,
            e2e_data=e2e_data_of(calibration, e2e_data, e2e_samples, e2e_seqlen, default=default_e2e),
            evaluation=None if eval_data == "none" else EvalConfig(eval_data, eval_tokens, eval_seqlen),
            opset=DEFAULT_OPSET if opset is None else opset, onnx_graph=onnx_graph,
            quantize=None if quantize == "none" else quantize, block_size=block_size, head_bits=head_bits, parity=not skip_parity,
        )
        if method is None:  # the default recipe: global-fisher and end-to-end refinement where they fit
            from .preflight import settle_default
            config = settle_default(config, allocation=allocation is None, refinement=refine is None)
        check_flags_apply(given, config)
        from . import dist
        main_rank = dist.launched_rank() == 0  # torchrun's RANK (the process group is joined by run, after preflight)
        echo = click.echo if main_rank else (lambda *_, **__: None)
        with output_dir.hold(out) if main_rank else contextlib.nullcontext():  # rank 0 alone writes --out
            signals.run_interruptible(lambda: run(config, overwrite=overwrite, progress=not quiet, echo=echo,
                                                  resume=resume))
    except KeyboardInterrupt:  # before the worker started (its own signals exit from signals.on_signal)
        click.echo("svd-export: interrupted; nothing was written under the output name", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 — the CLI's one place that turns errors into one line
        if debug:
            traceback.print_exception(exc)
        click.echo(f"svd-export: error: {one_line(exc, out)}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
