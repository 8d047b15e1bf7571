"""Throughput of an output folder: its compressed ONNX model against a dense export of the original, on
the best ONNX Runtime provider (checked), with PyTorch eager rows and the weight-bytes bound.

Used by `svd-export --validate throughput` (on the folder being written) and by
`svd-export-bench FOLDER` (on a finished one; report.json/report.md are updated in place)."""
from __future__ import annotations

import gc
import json
import logging
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import click
import torch

from .onnx.files import GRAPH_KEY, find_onnx, graph_metadata, is_quantized
from .validate.bound import bound_block, graph_bound_block
from .validate.providers import CHOICES, CUDA, resolve_provider
from .validate.throughput import ThroughputSettings, default_settings, eager_throughput, ort_throughput

log = logging.getLogger(__name__)


def export_model(model, tokenizer, folder: Path, dtype: str, graph: str = "plain") -> Path:
    """A model (here: the original one) through the project's ONNX exporter, as the compressed one went:
    the fused builder (float) or the dynamo export."""
    if graph == "fused":
        from .onnx.fused import build_onnx
        return build_onnx(model, tokenizer, folder, dtype)
    from .onnx.plain import export_onnx
    export_onnx(model, tokenizer, folder, dtype=dtype)
    return find_onnx(folder)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _speedups(dense: dict, compressed: dict) -> dict:
    return {f"speedup_{key}": compressed[f"{key}_tokens_s"] / dense[f"{key}_tokens_s"]
            for key in ("prefill", "decode", "end_to_end")}


def measure_folder(folder: Path, report: dict, *, provider: str = "auto", settings: ThroughputSettings | None = None,
                   dense_model=None, tokenizer=None, compressed_model=None, dense_onnx: Path | None = None,
                   export=export_model, echo=print) -> dict:
    """-> report.json's `throughput` block. The dense model is loaded from report['model'] unless given;
    its ONNX graph is exported (with `export`) unless `dense_onnx` is given (the run's own export)."""
    from .load.open import load
    from .output.artifact import load_compressed

    provider = resolve_provider(provider)
    settings = settings or default_settings(provider)
    compressed_onnx = find_onnx(folder)
    dtype = report["config"]["dtype"]
    device = "cuda" if provider == CUDA and torch.cuda.is_available() else "cpu"
    if dense_model is None:
        dense_model, tokenizer, _ = load(report["model"], dtype, device)
    limit = getattr(dense_model.config, "max_position_embeddings", None)
    if limit is not None and settings.prefill + settings.decode > limit:
        raise ValueError(f"prefill {settings.prefill} + decode {settings.decode} tokens exceed the model's "
                         f"{limit} positions")
    block: dict = {"provider": provider, "settings": asdict(settings), **bound_block(dense_model, report["layers"])}
    eager = {"device": str(next(dense_model.parameters()).device)}

    echo(f"throughput: PyTorch eager dense ({eager['device']})")
    eager["dense"] = eager_throughput(dense_model, settings)
    with tempfile.TemporaryDirectory(prefix="svd-export-dense-") as tmp:
        if dense_onnx is None:
            echo("throughput: exporting the dense model to ONNX")
            dense_onnx = export(dense_model, tokenizer, Path(tmp), dtype,
                                graph_metadata(compressed_onnx).get(GRAPH_KEY, "plain"))
        dense_model = None  # only this function's reference: a caller's model stays
        _free_memory()
        if compressed_model is None and (Path(folder) / "config.json").is_file() and any(Path(folder).glob("*.safetensors")):
            compressed_model = load_compressed(folder, device=eager["device"])
        if compressed_model is not None:
            echo("throughput: PyTorch eager compressed")
            eager["compressed"] = eager_throughput(compressed_model, settings)
            eager["speedup_decode"] = eager["compressed"]["decode_tokens_s"] / eager["dense"]["decode_tokens_s"]
        else:
            eager["compressed"] = None
            eager["note"] = "No PyTorch row for the compressed model: the folder has no safetensors (--format safetensors)."
        if is_quantized(compressed_onnx):  # its weight bytes are the graph's, not the PyTorch model's
            block.update(graph_bound_block(dense_onnx, compressed_onnx))
        echo(f"throughput: ONNX Runtime dense ({provider})")
        block["dense"] = ort_throughput(dense_onnx, provider, settings)
    echo(f"throughput: ONNX Runtime compressed ({provider})")
    block["compressed"] = ort_throughput(compressed_onnx, provider, settings)
    block.update(_speedups(block["dense"], block["compressed"]), eager=eager)
    return block


def summary_line(t: dict) -> str:
    return (f"throughput   {t['provider']}: decode {t['dense']['decode_tokens_s']:.1f} -> "
            f"{t['compressed']['decode_tokens_s']:.1f} tokens/s (x{t['speedup_decode']:.3f}, "
            f"bound x{t['bound_decode_speedup']:.3f})")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--provider", type=click.Choice(CHOICES), default="auto", show_default=True,
              help="ONNX Runtime provider; 'cuda' fails unless the session really runs on CUDA.")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Default: 4 on CUDA, 1 on the CPU.")
@click.option("--prefill", type=click.IntRange(min=1), default=None, help="Default: 1024 on CUDA, 128 on the CPU.")
@click.option("--decode", type=click.IntRange(min=1), default=None, help="Default: 256 on CUDA, 32 on the CPU.")
@click.option("--warmup", type=click.IntRange(min=0), default=None, show_default="1")
@click.option("--repeats", type=click.IntRange(min=1), default=None, show_default="3")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads of PyTorch and ONNX Runtime (default: OMP_NUM_THREADS, else PyTorch's).")
@click.option("--dense", default=None, help="The original model (default: report.json's 'model').")
def main(folder, provider, batch, prefill, decode, warmup, repeats, threads, dense):
    """Benchmark an svd-export output FOLDER: ONNX Runtime tokens/s dense vs compressed."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .report.markdown import write_report_md
    from .report.summary import write_json
    try:
        report_path = folder / "report.json"
        if not report_path.is_file():
            raise FileNotFoundError(f"{folder} has no report.json: not an svd-export output folder")
        report = json.loads(report_path.read_text())
        if dense:
            report["model"] = dense
        chosen = {k: v for k, v in dict(batch=batch, prefill=prefill, decode=decode, warmup=warmup,
                                        repeats=repeats, threads=threads).items() if v is not None}
        settings = replace(default_settings(resolve_provider(provider)), **chosen)
        report["throughput"] = measure_folder(folder, report, provider=provider, settings=settings, echo=click.echo)
        write_json(report, folder)
        write_report_md(report, folder)
        click.echo(summary_line(report["throughput"]))
        click.echo(f"updated {folder}/report.json and report.md")
    except Exception as exc:  # noqa: BLE001 — one line, non-zero exit
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        click.echo(f"svd-export-bench: error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
