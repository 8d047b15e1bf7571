"""The ONNX side of a run (`--format onnx`), in two halves around compress_:

  before: export the dense model once into a temporary work folder (and, when validating, check it
          against the still-dense PyTorch model);
  after:  write the compressed graph into the output folder, then validate: parity with the compressed
          PyTorch model, and ORT perplexity of both graphs against PyTorch's.

Two graphs (--onnx-graph): "fused" builds both directly from the weights (exporter/onnx/fused, ORT's
fused ops, --quantize possible); "plain" exports the dense model with torch.onnx (dynamo) and rewrites
that graph with the low-rank factors (graph_rewrite).

A quantized graph is checked against a copy of the PyTorch model carrying the same rounded weights, with
the tolerance of int8 activations (exporter/validate/parity.py: INT8_ACTIVATIONS); its perplexity is
reported next to PyTorch's float one: the price of quantization, not a correctness check.

The dense graph never reaches --out: it lives in a work folder next to it (output_dir.WorkFolder), removed
when the run ends, failed, interrupted or not; one left by a killed run is removed by the next run. A --resume
run keeps it inside its partial folder instead (output_dir.ResumableWorkFolder), with a record of the settings
it was written with and of its checks: the next run reuses it rather than writing it again (13 GB and minutes
at 7B), unless those settings changed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..config import Quantization, graph_dtype
from ..loop.walk import layer_by_layer
from ..model.corrected import corrections_of
from ..model.lowrank import LowRankLinear
from ..output.folder import ResumableWorkFolder, WorkFolder, empty_folder
from ..validate.ort_session import OrtDecoder
from ..validate.parity import parity, prompt_ids
from ..validate.perplexity import perplexity
from .plain import check_dtype, check_opset, export_compressed, export_onnx, onnx_arch

log = logging.getLogger(__name__)

PPL_REL_TOLERANCE = 0.005  # ORT perplexity within 0.5% of PyTorch's
DENSE_RECORD = "dense.json"  # in the dense graph's folder, written once the graph and its checks are complete


class ValidationError(RuntimeError):
    pass


def onnx_dtype(export_dtype: torch.dtype) -> str:
    """The ONNX graph's float type: the export dtype, except bfloat16 (no ONNX Runtime CPU kernels), which is
    written as float16; report.json's onnx.dtype says which one was used."""
    return {torch.float32: "float32", torch.float16: "float16"}[graph_dtype(export_dtype)]


def choose_graph(requested: str, config, quantized: bool) -> tuple[str, str]:
    """--onnx-graph auto → fused where the builder knows the family, else plain. -> (graph, why)."""
    if requested == "plain":
        return "plain", "--onnx-graph plain"
    from .fused import UnsupportedModel, family_of
    try:
        family_of(config)
        return "fused", f"--onnx-graph {requested}"
    except UnsupportedModel as exc:
        if requested == "fused" or quantized:  # asked for explicitly (or needed by --quantize): an error
            raise ValueError(f"{exc}{' (--quantize needs the fused graph)' if quantized else ''}") from exc
        return "plain", f"--onnx-graph auto: {exc}"


class OnnxStage:
    def __init__(self, out: Path, dtype: str, opset: int, validate: bool, graph: str = "auto",
                 quantization: Quantization | None = None, resumable_folder: Path | None = None):
        """`resumable_folder`: where a --resume run keeps the dense graph (inside its partial folder), else a
        work folder beside `out`."""
        check_opset(opset)
        check_dtype(dtype, None)
        if quantization is not None and graph == "plain":
            raise ValueError("--quantize needs the fused graph, not --onnx-graph plain")
        self.dtype, self.opset, self.validate = dtype, opset, validate
        self.graph, self.quantization = graph, quantization
        self.work = WorkFolder(out, "dense-onnx") if resumable_folder is None else ResumableWorkFolder(resumable_folder)
        # what the dense graph and its checks depend on besides the run's own settings (the resume key)
        self.dense_settings = {"dtype": dtype, "opset": opset, "graph": graph, "validate": validate,
                               "quantized": quantization is not None}
        self.dense_path: Path | None = None
        self.tokenizer = None
        self.report: dict = {"opset": opset, "dtype": dtype, "validated": validate, "graph": graph,
                             "quantize": None if quantization is None else
                             {"bits": quantization.bits, "block_size": quantization.block_size,
                              "symmetric": quantization.symmetric, "accuracy_level": quantization.accuracy_level,
                              "lm_head_bits": quantization.head().bits}}
        self.prompt: torch.Tensor | None = None
        self.streamed, self.progress = False, True

    def export_dense(self, model, tokenizer, source=None) -> None:
        """The dense graph (float: the baseline of the throughput measurement and of the parity checks).
        `source`: a streamed layer source: the graph is written one decoder layer at a time. A complete one left
        by a killed --resume run with the same settings is reused, with its checks."""
        self.tokenizer = tokenizer
        self.streamed = source is not None and source.streamed
        if self.validate:
            self.prompt = prompt_ids(tokenizer)
        if self._reuse_dense():
            return
        dense = Path(self.work.name) / "dense"
        self.graph, self.report["graph_reason"] = choose_graph(self.graph, model.config, self.quantization is not None)
        self.report["graph"] = self.graph
        if self.graph == "fused":
            self.dense_path = self._build(model, source if self.streamed else None, dense, None, "onnx (dense)")
        elif self.streamed:  # run.whole_model_reason loads the whole model for a plain graph
            raise RuntimeError("the plain ONNX export traces the whole model; it cannot run on a streamed source")
        else:
            arch = onnx_arch(model)  # an unsupported architecture is refused before the export starts
            self.report["genai"] = {"type": arch.genai_type, "model_type_known": arch.genai_known}
            if not arch.genai_known:
                self.report["genai"]["note"] = (
                    f"onnxruntime-genai has no model type of its own that serves this graph for "
                    f"{model.config.model_type!r}; genai_config.json uses its generic {arch.genai_type!r} type")
            self.dense_path = export_onnx(model, tokenizer, dense, self.dtype, self.opset)
        if self.validate:
            self.report["parity"] = {}
            if self._fits(self.dense_path, "dense"):
                self.report["parity"]["dense"] = self._parity(model, source, self._session(self.dense_path))
        record = {"settings": self.dense_settings, "file": str(self.dense_path.relative_to(self.work.name)),
                  "report": self.report}
        (Path(self.work.name) / DENSE_RECORD).write_text(json.dumps(record, indent=1))

    def _reuse_dense(self) -> bool:
        """Take the dense graph and its checks from the work folder when a killed --resume run completed them
        with the same settings; otherwise empty the folder (a partial or different graph) -> False."""
        folder = Path(self.work.name)
        record_path = folder / DENSE_RECORD
        record = json.loads(record_path.read_text()) if record_path.exists() else None
        if record is None or record["settings"] != self.dense_settings or not (folder / record["file"]).exists():
            empty_folder(folder)
            return False
        self.report, self.dense_path = record["report"], folder / record["file"]
        self.graph = self.report["graph"]
        self.report["dense_reused"] = "the dense graph and its checks come from the killed run this one resumed"
        log.info("reusing the dense ONNX graph of the killed run (%s)", self.dense_path)
        return True

    def _build(self, model, source, folder: Path, quantization, desc: str) -> Path:
        """The fused graph: from a resident model, or layer by layer from a streamed source."""
        from .fused import FusedDecoderWriter, build_onnx
        if source is None:
            return build_onnx(model, self.tokenizer, folder, self.dtype, quantization, self.opset)
        writer = FusedDecoderWriter(model.config, folder, self.dtype, quantization, self.opset)
        writer.add_outside(model)
        for index, layer in layer_by_layer(source, 0, desc if self.progress else None):
            writer.add_layer(index, layer)
        return writer.finish(self.tokenizer, getattr(model, "generation_config", None))

    def _parity(self, model, source, decoder: OrtDecoder, reference=None, int8_activations: bool = False) -> dict:
        if self.streamed:
            from ..validate.streamed_parity import streamed_parity
            return streamed_parity(source, decoder, self.prompt, self.dtype)
        return parity(reference or model, decoder, self.prompt, self.dtype, int8_activations=int8_activations)

    def _session(self, path: Path) -> OrtDecoder:
        return OrtDecoder.load(path, low_memory=self.streamed)

    def _fits(self, path: Path, kind: str) -> bool:
        """Whether ONNX Runtime can run this graph here for the checks; if not, the report says what was
        not checked and why. ORT's CPU kernels are float32: a float16 graph's weights are cast, and the
        casts of initializers run first (measured: a 1.2 GB float16 graph peaked 3.4 GB, 1.26 GB of it the mapping)."""
        import onnxruntime as ort

        from ..load.open import available_bytes
        weights = sum(f.stat().st_size for f in path.parent.glob("*.onnx*"))
        on_cpu = "CUDAExecutionProvider" not in ort.get_available_providers()
        need = weights * (3 if on_cpu and self.dtype == "float16" else 1)  # mapping + float32 casts
        have = available_bytes(torch.device("cpu"))
        if need <= have:
            return True
        reason = (f"not run: ONNX Runtime on {'CPU' if on_cpu else 'CUDA'} would need ~{need / 1e9:.1f} GB for the "
                  f"{kind} graph ({weights / 1e9:.1f} GB of {self.dtype} weights{', cast to float32 on the CPU' if on_cpu and self.dtype == 'float16' else ''}), "
                  f"{have / 1e9:.1f} GB available; the graph was written but not run (svd-export-bench runs it on a GPU)")
        self.report.setdefault("not_checked", {})[kind] = reason
        log.warning("ONNX %s parity and perplexity %s", kind, reason)
        return False

    def finish(self, model, folder: Path, perplexities: dict | None, eval_ids=None, window: int = 0,
               progress: bool = True, keep_dense: bool = False, source=None) -> dict:
        """Write the compressed model.onnx into `folder`; validate; return the report's `onnx` entry.
        Adds `onnx_dense` / `onnx_compressed` to `perplexities` (the report's perplexity block).
        keep_dense: the dense graph stays for a later measurement (throughput) until cleanup().
        source: the streamed source; the compressed layers are then read back from `folder`'s safetensors."""
        try:
            written = None
            if self.streamed:
                from ..load.written import WrittenSource
                written = WrittenSource(source, folder)
            if self.graph == "fused":
                path = self._build(model, written, folder, self.quantization, "onnx (compressed)")
                corrections = len(corrections_of(model))  # a correction is a LowRankLinear too: not a rewrite
                count = sum(isinstance(m, LowRankLinear) for m in model.modules()) - corrections
                if corrections:
                    self.report["corrections"] = corrections
            else:
                path, count = export_compressed(self.dense_path, model, folder)
            self.report.update(file=path.name, rewritten_linears=count)
            if self.validate:
                self._validate(model, written, path, perplexities, eval_ids, window, progress)
            return self.report
        except BaseException:
            self.cleanup()
            raise
        finally:
            if not keep_dense:
                self.cleanup()

    def cleanup(self) -> None:
        self.work.cleanup()

    def _validate(self, model, written, path: Path, perplexities, eval_ids, window, progress) -> None:
        if not self._fits(path, "compressed"):
            return
        compressed = self._session(path)  # one ORT session at a time: a big model's graph is held once
        q = self.quantization
        if q is None:
            self.report["parity"]["compressed"] = self._parity(model, written, compressed)
        elif self.streamed:  # the reference's layers are rounded as they are read, its lm_head for the pass
            from ..load.written import WrittenSource
            from ..validate.streamed_parity import streamed_parity
            from .fused.reference import round_layer_, rounded_head
            rounded = WrittenSource(written, written.files.folder, transform=lambda layer: round_layer_(layer, q))
            with rounded_head(model, q):
                self.report["parity"]["compressed"] = streamed_parity(
                    rounded, compressed, self.prompt, self.dtype, int8_activations=q.accuracy_level == 4)
        else:  # PyTorch with the same rounded weights: only the activations' rounding differs
            from .fused.reference import round_like_export
            self.report["parity"]["compressed"] = self._parity(model, None, compressed, round_like_export(model, q),
                                                               int8_activations=q.accuracy_level == 4)
        self.report["provider"] = compressed.provider
        failures = [f"{kind} logits/greedy parity (max |diff| {p['max_abs_diff']:.3g}, top-1 {p['top1_agreement']:.3f},"
                    f" greedy equal {p['greedy']['equal']})"
                    for kind, p in self.report["parity"].items() if not p["passed"]]
        if eval_ids is not None and perplexities is not None:
            for kind in ("compressed", "dense"):
                if kind == "dense" and "dense" not in self.report["parity"]:
                    continue  # the dense graph did not fit either (reported)
                decoder = compressed if kind == "compressed" else self._session(self.dense_path)
                compressed = None
                ppl = perplexity(decoder.logits_fn(), eval_ids, window, f"perplexity (onnx {kind})", progress)
                del decoder
                perplexities[f"onnx_{kind}"] = ppl
                rel = abs(ppl - perplexities[kind]) / perplexities[kind]
                if kind == "compressed" and self.quantization is not None:
                    continue  # quantization changes the model: reported, not a parity check
                if rel > PPL_REL_TOLERANCE:
                    failures.append(f"ONNX {kind} perplexity {ppl:.4f} vs PyTorch {perplexities[kind]:.4f} "
                                    f"({rel:.2%} > {PPL_REL_TOLERANCE:.1%})")
        if failures:
            raise ValidationError("ONNX validation failed: " + "; ".join(failures)
                                  + " (--skip-parity writes the artifact without these checks)")
