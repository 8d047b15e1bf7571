"""One run, top to bottom: open the model as a stream of decoder layers → calibration and evaluation data →
compress_source (profile pass, rank plan, compression pass; the evaluation windows and the shard writer ride
along, layer by layer, with a checkpoint after every layer) → perplexity from the streams → artifacts →
report. Everything lands in a temporary folder renamed to --out at the end.
"""
from __future__ import annotations

import hashlib
import json
import logging
import resource
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from . import __version__
from .allocation import needs as allocation_needs
from .artifacts import CONFIG_KEY
from .checksums import record_checksums
from .budget import weight_bytes
from .calibration.data import calibration_batches, evaluation_tokens
from .compress import compress_source
from .config import RunConfig
from .models import open_source
from .output_dir import atomic_output, empty_folder, resume_folder
from .preflight import preflight
from .recipe import recipe_name
from .report import count_params, ratio_block, summary, write_json
from .report_md import write_report_md
from .shards import ShardWriter
from .stream.checkpoint import FOLDER as CHECKPOINT_FOLDER
from .stream.checkpoint import Checkpoint, refuse_other_settings
from .validate.perplexity import eval_windows, model_window, perplexity, streamed_logits

log = logging.getLogger(__name__)

DENSE_ONNX_FOLDER = ".dense-onnx"  # inside a --resume run's partial folder: the dense graph, kept across kills
FORMATS = ("safetensors", "onnx")


class Timer:
    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


def peak_memory() -> dict:
    peak = {"host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def whole_model_reason(config: RunConfig, model_config=None) -> str | None:
    """Why this run needs the whole model in memory at once (None: it streams one decoder layer at a time).
    `model_config`: the checkpoint's config, for what depends on the family (the ONNX graph)."""
    if config.compression.method == "fwsvd":
        return "FWSVD's Fisher information is a backward pass of the whole model"
    if "sensitivity" in allocation_needs(config.compression.allocation_name):
        return f"the {config.compression.allocation_name} allocation needs a backward pass of the whole model"
    if config.compression.refine_e2e:
        return "--refine e2e backpropagates through the whole model"
    if config.calibration.source == "generated" or (config.evaluation and config.evaluation.source == "generated"):
        return "'generated' data is written by the whole model, token by token"
    if "onnx" in config.formats and model_config is not None:
        from .onnx_stage import choose_graph
        graph, why = choose_graph(config.onnx_graph, model_config, config.quantize is not None)
        if graph == "plain":  # the fused graph is written layer by layer; the plain one is traced whole
            return f"the plain ONNX export traces the whole model ({why})"
    return None


def run_settings(config: RunConfig) -> dict:
    """What makes two runs the same run (the resume key): everything that changes the compressed weights
    or the measured perplexity; not where the result goes or which extra artifacts are written."""
    d = json.loads(config.to_json())
    return {k: d[k] for k in ("model", "dtype", "compression", "calibration", "evaluation")}


def run_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def write_sidecars(model, tokenizer, folder: Path, meta: dict, dtype: torch.dtype) -> None:
    """config.json (with the rank plan under CONFIG_KEY and the export dtype), generation config, tokenizer."""
    config = type(model.config).from_dict(model.config.to_dict())
    config.dtype = dtype
    config.__dict__[CONFIG_KEY] = meta
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run(config: RunConfig, overwrite: bool = False, progress: bool = True, echo=print, resume: bool = False) -> dict:
    preflight(config, overwrite)  # everything checkable before loading weights: a bad argument costs seconds
    unknown = set(config.formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown --format {sorted(unknown)[0]!r}; choose from {', '.join(FORMATS)}")
    if "throughput" in config.validations and "onnx" not in config.formats:
        raise ValueError("--validate throughput measures the ONNX export: add --format onnx")
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not overwrite:  # fail before any work, not after
        raise FileExistsError(f"output folder {out} exists and is not empty (use --overwrite)")
    quantization = None
    if "onnx" in config.formats:  # before any work
        from .onnx_export import check_opset
        from .quantization import Quantization
        check_opset(config.opset)
        quantization = Quantization.parse(config.quantize, config.block_size)
    timer = Timer()
    with timer("load"):
        source, tokenizer, origin, export_dtype = open_source(config.model, config.dtype, config.device,
                                                              whole_model=lambda c: whole_model_reason(config, c))
    model = source.model
    dense_total = count_params(model)
    report: dict = {"tool": f"svd-export {__version__}", "model": config.model, "source": origin.describe(),
                    "config": json.loads(config.to_json()), "streamed": source.streamed,
                    "dtype": {"export": str(export_dtype).removeprefix("torch."),
                              "compute": str(source.compute_dtype).removeprefix("torch.")}}

    eval_ids, window, eval_batches = None, 0, None
    if config.evaluation is not None:
        window = model_window(model, config.evaluation.seqlen)
        with timer("eval_data"):
            eval_ids = evaluation_tokens(model, tokenizer, config.evaluation.source, config.evaluation.max_tokens,
                                         window)
        eval_batches = eval_windows(eval_ids, window)

    cal = config.calibration
    with timer("calibration_data"):
        batches = calibration_batches(model, tokenizer, cal.source, cal.samples, cal.seqlen, cal.seed, cal.batch_size,
                                      cal.allow_overlap)

    settings = run_settings(config)
    key = run_key(settings)
    if resume and not resume_folder(out, key).exists():
        refuse_other_settings(sorted(out.parent.glob(f".{out.name}.partial-*")), settings)
    with atomic_output(out, overwrite, resume_key=key, keep_on_interrupt=resume) as tmp:
        if not resume:  # what a killed run of the same settings left: start afresh
            empty_folder(tmp)
        onnx_stage = None
        if "onnx" in config.formats:  # the dense graph first: the baseline of parity and throughput
            from .onnx_stage import OnnxStage, onnx_dtype
            onnx_stage = OnnxStage(out, onnx_dtype(export_dtype), config.opset, config.parity, config.onnx_graph,
                                   quantization, resumable_folder=tmp / DENSE_ONNX_FOLDER if resume else None)
            onnx_stage.progress = progress
            with timer("onnx_export"):
                onnx_stage.export_dense(model, tokenizer, source)
        checkpoint = Checkpoint(tmp, settings)
        writer = ShardWriter(tmp, export_dtype)
        with timer("compress"):
            result, streams = compress_source(source, batches, config.compression, eval_batches, writer, checkpoint,
                                              export_dtype, progress=progress)
        del batches
        ppl: dict = {}
        if eval_batches is not None:
            with timer("perplexity"):
                for kind, stream in (("dense", streams.eval_dense), ("compressed", streams.eval_compressed)):
                    ppl[kind] = perplexity(streamed_logits(model, source.arch, stream.hidden, source.device),
                                           eval_ids, window, f"perplexity ({kind})", progress)
            ppl.update(tokens=len(eval_batches) * window, window=window, source=config.evaluation.source)
        del streams

        linears_dense, linears_after = result.linear_params()
        report.update(
            recipe=recipe_name(config.compression),
            method=result.method, allocation=result.allocation, propagate=config.compression.propagation,
            ratio=ratio_block(result.ratio, linears_dense, linears_after, dense_total, count_params(model)),
            **({"budget": {"bytes": config.compression.budget_bytes, "weight_bytes": weight_bytes(model, export_dtype)}}
               if config.compression.budget_bytes is not None else {}),
            params={"dense_total": dense_total, "compressed_total": count_params(model),
                    "linears_dense": linears_dense, "linears_compressed": linears_after},
            perplexity=ppl or None,
            dense_linears=len(result.matrices) - len(result.plan),
            layer_similarity=result.layer_similarity,
            layer_ratios=result.layer_ratios(),
            layer_seconds=result.layer_seconds,
            layers={name: {"rank": rec.rank, "ratio": 1.0 - rec.rank * sum(rec.shape) / (rec.shape[0] * rec.shape[1]),
                           "loss": rec.loss, "loss_min": rec.loss_min, "shape": list(rec.shape)}
                    for name, rec in result.records.items()},
            **({"method_details": result.extra} if result.extra else {}),
        )
        meta = {"method": result.method, "allocation": result.allocation, "ratio": result.ratio,
                "ranks": dict(result.plan)}
        with timer("save_safetensors"):
            writer.write_rest(model, source.arch.layers)
            files = writer.finish()
            write_sidecars(model, tokenizer, tmp, meta, export_dtype)
            record_checksums(tmp)
        shutil.rmtree(tmp / CHECKPOINT_FOLDER, ignore_errors=True)
        if onnx_stage is not None:
            with timer("onnx"):
                report["onnx"] = onnx_stage.finish(model, tmp, ppl or None, eval_ids, window, progress,
                                                   keep_dense="throughput" in config.validations, source=source)
        if "throughput" in config.validations:  # against the dense graph exported above, then dropped
            from .bench import measure_folder
            with timer("throughput"):
                try:
                    report["throughput"] = measure_folder(tmp, report, compressed_model=model,
                                                          dense_onnx=onnx_stage.dense_path, echo=echo)
                finally:
                    onnx_stage.cleanup()
        if "safetensors" not in config.formats:
            for f in files + [tmp / "model.safetensors.index.json"]:
                f.unlink(missing_ok=True)
        if onnx_stage is not None:
            onnx_stage.cleanup()  # (done already, unless an earlier stage skipped it) never part of the output
        report["timings_s"] = dict(timer.timings)
        report["peak_memory"] = peak_memory()
        write_json(report, tmp)
        write_report_md(report, tmp)
    echo(summary(report))
    if "throughput" in report:
        from .bench import summary_line
        echo(summary_line(report["throughput"]))
    echo(f"wrote {out}/")
    return report
