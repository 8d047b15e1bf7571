"""One run, top to bottom: load → (dense perplexity) → calibration data → compress_ → (compressed
perplexity) → artifacts → report. Everything lands in a temporary folder renamed to --out at the end."""
from __future__ import annotations

import json
import logging
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from . import __version__
from .architectures import prepare
from .artifacts import atomic_output, save_safetensors
from .budget import weight_bytes
from .calibration.data import calibration_batches, evaluation_tokens
from .compress import compress_
from .config import RunConfig
from .models import load
from .report import count_params, ratio_block, summary, write_json
from .report_md import write_report_md
from .validate.perplexity import model_window, perplexity, torch_logits

log = logging.getLogger(__name__)
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


def run(config: RunConfig, overwrite: bool = False, progress: bool = True, echo=print) -> dict:
    unknown = set(config.formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown --format {sorted(unknown)[0]!r}; choose from {', '.join(FORMATS)}")
    if "throughput" in config.validations and "onnx" not in config.formats:
        raise ValueError("--validate throughput measures the ONNX export: add --format onnx")
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not overwrite:  # fail before any work, not after
        raise FileExistsError(f"output folder {out} exists and is not empty (use --overwrite)")
    onnx_stage = None
    if "onnx" in config.formats:  # checks --opset/--dtype now, before any work
        from .onnx_stage import OnnxStage
        onnx_stage = OnnxStage(out, config.dtype, config.opset, config.parity)
    timer = Timer()
    with timer("load"):
        model, tokenizer, source = load(config.model, config.dtype, config.device)
        prepare(model)  # an architecture the compressor cannot handle is one line here, before any work
    dense_total = count_params(model)
    report: dict = {"tool": f"svd-export {__version__}", "model": config.model, "source": source.describe(),
                    "config": json.loads(config.to_json())}

    ppl: dict = {}
    eval_ids, window = None, 0
    if config.evaluation is not None:
        window = model_window(model, config.evaluation.seqlen)
        with timer("eval_data"):
            eval_ids = evaluation_tokens(model, tokenizer, config.evaluation.source, config.evaluation.max_tokens,
                                         window)
        with timer("perplexity_dense"):
            ppl["dense"] = perplexity(torch_logits(model), eval_ids, window, "perplexity (dense)", progress)
        ppl.update(tokens=int(eval_ids.numel() // window * window), window=window, source=config.evaluation.source)

    if onnx_stage is not None:  # the dense graph, exported once; the compressed one is a rewrite of it
        with timer("onnx_export"):
            onnx_stage.export_dense(model, tokenizer)

    cal = config.calibration
    with timer("calibration_data"):
        batches = calibration_batches(model, tokenizer, cal.source, cal.samples, cal.seqlen, cal.seed, cal.batch_size)
    with timer("compress"):
        result = compress_(model, batches, config.compression, progress=progress)
    del batches

    if config.evaluation is not None:
        with timer("perplexity_compressed"):
            ppl["compressed"] = perplexity(torch_logits(model), eval_ids, window, "perplexity (compressed)", progress)

    linears_dense, linears_after = result.linear_params()
    report.update(
        method=result.method, allocation=result.allocation, propagate=config.compression.propagation,
        ratio=ratio_block(result.ratio, linears_dense, linears_after, dense_total, count_params(model)),
        **({"budget": {"bytes": config.compression.budget_bytes, "weight_bytes": weight_bytes(model)}}
           if config.compression.budget_bytes is not None else {}),
        params={"dense_total": dense_total, "compressed_total": count_params(model),
                "linears_dense": linears_dense, "linears_compressed": linears_after},
        perplexity=ppl or None,
        dense_linears=len(result.matrices) - len(result.plan),
        layer_similarity=result.layer_similarity,
        layer_ratios=result.layer_ratios(),
        layers={name: {"rank": rec.rank, "ratio": 1.0 - rec.rank * sum(rec.shape) / (rec.shape[0] * rec.shape[1]),
                       "loss": rec.loss, "loss_min": rec.loss_min, "shape": list(rec.shape)}
                for name, rec in result.records.items()},
        **({"method_details": result.extra} if result.extra else {}),
    )
    meta = {"method": result.method, "allocation": result.allocation, "ratio": result.ratio,
            "ranks": dict(result.plan)}
    with atomic_output(out, overwrite) as tmp:
        if "safetensors" in config.formats:
            with timer("save_safetensors"):
                save_safetensors(model, tokenizer, tmp, meta)
        if onnx_stage is not None:
            with timer("onnx"):
                report["onnx"] = onnx_stage.finish(model, tmp, ppl or None, eval_ids, window, progress,
                                                   keep_dense="throughput" in config.validations)
        if "throughput" in config.validations:  # against the dense graph exported above, then dropped
            from .bench import measure_folder
            with timer("throughput"):
                try:
                    report["throughput"] = measure_folder(tmp, report, compressed_model=model,
                                                          dense_onnx=onnx_stage.dense_path, echo=echo)
                finally:
                    onnx_stage.cleanup()
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
