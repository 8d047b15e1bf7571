"""One run, top to bottom: check everything checkable → open the model as a stream of decoder layers →
calibration and evaluation data → (the dense ONNX graph) → the layer loop (profile pass, rank plan,
compression pass; the evaluation windows and the shard writer ride along, layer by layer, with a resume
state after every layer) → perplexity from the streams → safetensors → (the compressed ONNX graph and its
checks, throughput) → report. Everything lands in a temporary folder renamed to --out at the end.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, dist
from .config import RunConfig
from .data.text import SOURCES
from .data.windows import calibration_batches, evaluation_tokens
from .load.open import open_source, pick_device
from .loop.compress import compress_source
from .loop.head_quantization import head_weight
from .model.head import stored_hidden_logits
from .output.artifact import drop_weight_files, finish_artifact
from .output.folder import atomic_output, check_out_path, empty_folder, resume_folder
from .output.resume_state import FOLDER as RESUME_FOLDER
from .output.resume_state import ResumeState, refuse_other_settings
from .output.shards import ShardWriter
from .plan.budget import weight_bytes
from .preflight import preflight
from .recipe import recipe_name
from .report.markdown import write_report_md
from .report.summary import count_params, ratio_block, summary, write_json
from .validate.perplexity import eval_windows, model_window, nll_sum

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
    if "generated" in (config.calibration.source, config.evaluation and config.evaluation.source,
                       config.e2e_data and config.e2e_data.source):
        return "'generated' data is written by the whole model, token by token"
    if "onnx" in config.formats and model_config is not None:
        from .onnx.stage import choose_graph
        graph, why = choose_graph(config.onnx_graph, model_config, config.quantize is not None)
        if graph == "plain":  # the fused graph is written layer by layer; the plain one is traced whole
            return f"the plain ONNX export traces the whole model ({why})"
    return None


def in_sample(config: RunConfig) -> str | None:
    """Why the perplexity would be measured on text the run trained on (None: it is not): the file given to
    --eval-data also given to --calib-data or --e2e-data. wikitext2 calibrates on its train split and evaluates
    on its test split, and generated text is written with other seeds for each, so only a file can be both."""
    if config.evaluation is None or config.evaluation.source in SOURCES or not Path(config.evaluation.source).exists():
        return None
    evaluation = Path(config.evaluation.source).resolve()
    for flag, data in (("calibration", config.calibration), ("end-to-end", config.e2e_data)):
        if data is None or data.source in SOURCES or not Path(data.source).exists():
            continue
        if Path(data.source).resolve() == evaluation:
            return f"--eval-data is the {flag} text ({config.evaluation.source}): the perplexity is in-sample"
    return None


def run_settings(config: RunConfig) -> dict:
    """What makes two runs the same run (the resume key): everything that changes the compressed weights
    or the measured perplexity; not where the result goes or which extra artifacts are written."""
    d = json.loads(config.to_json())
    return {k: d[k] for k in ("model", "dtype", "compression", "calibration", "evaluation", "e2e_data")}


def run_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def check_run(config: RunConfig, overwrite: bool):
    """Everything checkable before a weight is loaded: a bad argument costs seconds. -> the quantization."""
    preflight(config, overwrite)
    unknown = set(config.formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown --format {sorted(unknown)[0]!r}; choose from {', '.join(FORMATS)}")
    if "throughput" in config.validations and "onnx" not in config.formats:
        raise ValueError("--validate throughput measures the ONNX export: add --format onnx")
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not overwrite:  # fail before any work, not after
        raise FileExistsError(f"output folder {out} exists and is not empty (use --overwrite)")
    if "onnx" not in config.formats:
        return None
    from .onnx.plain import check_opset
    check_opset(config.opset)
    return config.quantization


@dataclass
class RunData:
    batches: list[torch.Tensor]  # calibration batches
    eval_ids: torch.Tensor | None = None  # the evaluation token stream (None: --eval-data none)
    window: int = 0  # perplexity window
    eval_batches: list[torch.Tensor] | None = None  # eval_ids cut into windows (this rank's share under torchrun)
    eval_windows: int = 0  # windows in all
    e2e_batches: list[torch.Tensor] | None = None  # end-to-end refinement's own data (None: the calibration batches)


def run_data(config: RunConfig, model, tokenizer, timer: Timer) -> RunData:
    data = RunData([])
    if config.evaluation is not None:
        data.window = model_window(model, config.evaluation.seqlen)
        with timer("eval_data"):
            data.eval_ids = evaluation_tokens(model, tokenizer, config.evaluation.source, config.evaluation.max_tokens,
                                              data.window)
        data.eval_batches = eval_windows(data.eval_ids, data.window)
        data.eval_windows = len(data.eval_batches)
    cal = config.calibration
    with timer("calibration_data"):
        data.batches = calibration_batches(model, tokenizer, cal.source, cal.samples, cal.seqlen, cal.seed,
                                           cal.batch_size, cal.allow_overlap)
    e2e = config.e2e_data
    if e2e is not None:
        with timer("e2e_data"):
            data.e2e_batches = calibration_batches(model, tokenizer, e2e.source, e2e.samples, e2e.seqlen, e2e.seed,
                                                   e2e.batch_size, e2e.allow_overlap, flags="--e2e")
    if dist.active():  # every rank made the same (seeded) batches: each keeps its share
        for what, items in (("calibration batches", data.batches), ("evaluation windows", data.eval_batches or []),
                            ("end-to-end batches", data.e2e_batches or [])):
            if items and len(items) < dist.world_size():
                raise ValueError(f"{len(items)} {what} for {dist.world_size()} processes: each needs one at least")
        data.batches = dist.shard(data.batches)
        data.eval_batches = dist.shard(data.eval_batches) if data.eval_batches is not None else None
        data.e2e_batches = dist.shard(data.e2e_batches) if data.e2e_batches is not None else None
    return data


def streamed_perplexity(config: RunConfig, source, streams, data: RunData, progress: bool) -> dict:
    """Perplexity of the dense and the compressed model from the evaluation windows' final hidden states, which
    the layer loop carried through both."""
    ppl = {}
    for kind, stream in (("dense", streams.eval_dense), ("compressed", streams.eval_compressed)):
        logits = stored_hidden_logits(source.model, source.arch, stream.hidden, source.device)
        with head_weight(source.model, streams.dense_head if kind == "dense" else None):  # --quantize: float
            nll, count = dist.sum_floats(*nll_sum(logits, data.eval_batches, f"perplexity ({kind})", progress))
        ppl[kind] = math.exp(nll / count)  # count > 0: eval_windows refuses text shorter than one window
    ppl.update(tokens=data.eval_windows * data.window, window=data.window, source=config.evaluation.source)
    why = in_sample(config)
    if why:
        ppl["in_sample"] = why
    return ppl


def compression_report(config: RunConfig, result, model, export_dtype: torch.dtype, dense_total: int,
                       ppl: dict) -> dict:
    """report.json's entries about the compression: recipe, realised ratio, parameters, per-matrix ranks and
    losses, per-layer measurements."""
    linears_dense, linears_after = result.linear_params()
    budget = ({"budget": {"bytes": config.compression.budget_bytes, "weight_bytes": weight_bytes(model, export_dtype)}}
              if config.compression.budget_bytes is not None else {})
    return dict(
        recipe=recipe_name(config.compression),
        method=result.method, allocation=result.allocation, propagate=config.compression.propagation,
        ratio=ratio_block(result.ratio, linears_dense, linears_after, dense_total, count_params(model)),
        **budget,
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


def onnx_stage_of(config: RunConfig, out: Path, tmp: Path, export_dtype, quantization, resume: bool, progress: bool):
    """--format onnx: the stage that writes the dense graph now (the baseline of parity and throughput) and the
    compressed one after the loop; None without --format onnx."""
    if "onnx" not in config.formats:
        return None
    from .onnx.stage import OnnxStage, onnx_dtype
    stage = OnnxStage(out, onnx_dtype(export_dtype), config.opset, config.parity, config.onnx_graph, quantization,
                      resumable_folder=tmp / DENSE_ONNX_FOLDER if resume else None)
    stage.progress = progress
    return stage


def finish_onnx(config: RunConfig, onnx_stage, model, tmp: Path, report: dict, data: RunData, source, timer: Timer,
                progress: bool, echo) -> None:
    """The compressed graph and its checks, then (--validate throughput) its speed against the dense graph."""
    ppl = report["perplexity"]
    with timer("onnx"):
        report["onnx"] = onnx_stage.finish(model, tmp, ppl, data.eval_ids, data.window, progress,
                                           keep_dense="throughput" in config.validations, source=source)
    if "throughput" in config.validations:  # against the dense graph exported before, then dropped
        from .bench import measure_folder
        with timer("throughput"):
            try:
                report["throughput"] = measure_folder(tmp, report, compressed_model=model,
                                                      dense_onnx=onnx_stage.dense_path, echo=echo)
            finally:
                onnx_stage.cleanup()


@contextmanager
def work_folder(out: Path, overwrite: bool, key: str, resume: bool):
    """Where the run writes. Rank 0 (or the one process): the partial folder beside --out, renamed into place at
    the end. The other ranks under torchrun: a temporary folder of their own (their copy of the shards, which
    end-to-end refinement reads back): they never touch the output folder."""
    if dist.is_main():
        with atomic_output(out, overwrite, resume_key=key, keep_on_interrupt=resume) as tmp:
            if not resume:  # what a killed run of the same settings left: start afresh
                empty_folder(tmp)
            yield tmp
    else:
        with tempfile.TemporaryDirectory(prefix=f"svd-export-rank{dist.rank()}-") as tmp:
            yield Path(tmp)


def write_outputs(config: RunConfig, report: dict, result, writer, model, tokenizer, source, export_dtype, onnx_stage,
                  data: RunData, tmp: Path, timer: Timer, progress: bool, echo) -> None:
    """Rank 0's part after the loop: safetensors, the compressed ONNX graph and its checks, report.json/md."""
    meta = {"method": result.method, "allocation": result.allocation, "ratio": result.ratio, "ranks": dict(result.plan),
            **({"corrections": result.extra["corrections"]} if result.extra.get("corrections") else {})}
    with timer("save_safetensors"):
        files = finish_artifact(writer, model, source.arch.layers, tokenizer, tmp, meta, export_dtype)
    shutil.rmtree(tmp / RESUME_FOLDER, ignore_errors=True)
    try:
        if onnx_stage is not None:
            finish_onnx(config, onnx_stage, model, tmp, report, data, source, timer, progress, echo)
    finally:
        if onnx_stage is not None:
            onnx_stage.cleanup()  # never part of the output
    if "safetensors" not in config.formats:
        drop_weight_files(tmp, files)
    report["timings_s"] = dict(timer.timings)
    report["peak_memory"] = peak_memory()
    write_json(report, tmp)
    write_report_md(report, tmp)


def run(config: RunConfig, overwrite: bool = False, progress: bool = True, echo=print, resume: bool = False) -> dict:
    """One run (see the module docstring). Under torchrun every rank calls it: each compresses with its share of
    the calibration batches and evaluation windows; rank 0 alone writes and returns the report (the others: {})."""
    quantization = check_run(config, overwrite)
    dist.init_from_env(pick_device(config.device))  # torchrun: join its process group (one process: nothing)
    if resume and dist.active():
        raise ValueError("--resume continues a run of one process: run it without torchrun, or start afresh")
    if in_sample(config) and dist.is_main():
        log.warning("%s: calibration saw every evaluated token", in_sample(config))
    out, timer = check_out_path(config.out), Timer()  # a symbolic link: the folder it points to
    device = dist.local_device(pick_device(config.device))
    with timer("load"):
        source, tokenizer, origin, export_dtype = open_source(config.model, config.dtype, str(device),
                                                              whole_model=lambda c: whole_model_reason(config, c))
    model = source.model
    dense_total = count_params(model)
    report: dict = {"tool": f"svd-export {__version__}", "model": config.model, "source": origin.describe(),
                    "config": json.loads(config.to_json()), "streamed": source.streamed,
                    "dtype": {"export": str(export_dtype).removeprefix("torch."),
                              "compute": str(source.compute_dtype).removeprefix("torch.")},
                    "world_size": dist.world_size()}
    data = run_data(config, model, tokenizer, timer)
    settings = run_settings(config)
    key = run_key(settings)
    if resume and not resume_folder(out, key).exists():
        refuse_other_settings(sorted(out.parent.glob(f".{out.name}.partial-*")), settings)
    with work_folder(out, overwrite, key, resume) as tmp:
        onnx_stage = onnx_stage_of(config, out, tmp, export_dtype, quantization, resume, progress) if dist.is_main() \
            else None
        if onnx_stage is not None:
            with timer("onnx_export"):
                onnx_stage.export_dense(model, tokenizer, source)
        writer = ShardWriter(tmp, export_dtype)
        with timer("compress"):
            result, streams = compress_source(source, data.batches, config.compression, data.eval_batches, writer,
                                              None if dist.active() else ResumeState(tmp, settings), export_dtype,
                                              progress=progress and dist.is_main(), work=tmp / RESUME_FOLDER / "e2e",
                                              e2e_batches=data.e2e_batches)
        data.batches, data.e2e_batches = [], None
        ppl = {}
        if data.eval_batches is not None:
            with timer("perplexity"):
                ppl = streamed_perplexity(config, source, streams, data, progress and dist.is_main())
        del streams
        if not dist.is_main():
            return {}
        report.update(compression_report(config, result, model, export_dtype, dense_total, ppl))
        write_outputs(config, report, result, writer, model, tokenizer, source, export_dtype, onnx_stage, data, tmp,
                      timer, progress, echo)
    echo(summary(report))
    if "throughput" in report:
        from .bench import summary_line
        echo(summary_line(report["throughput"]))
    echo(f"wrote {out}/")
    return report
