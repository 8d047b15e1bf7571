"""The ONNX side of a run (`--format onnx`), in two halves around compress_:

  before: export the dense model once into a temporary work folder (and, when validating, check it
          against the still-dense PyTorch model);
  after:  rewrite that graph with the low-rank factors into the output folder, then validate:
          parity with the compressed PyTorch model, and ORT perplexity of both graphs against PyTorch's.

The dense graph never reaches --out: it lives in a work folder next to it (output_dir.WorkFolder), removed
when the run ends, failed, interrupted or not; one left by a killed run is removed by the next run.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .onnx_export import check_dtype, check_opset, export_compressed, export_onnx, onnx_arch
from .output_dir import WorkFolder
from .validate.ort_session import OrtDecoder
from .validate.parity import parity, prompt_ids
from .validate.perplexity import perplexity

log = logging.getLogger(__name__)

PPL_REL_TOLERANCE = 0.005  # ORT perplexity within 0.5% of PyTorch's


class ValidationError(RuntimeError):
    pass


def onnx_dtype(export_dtype: torch.dtype) -> str:
    """The ONNX graph's float type: the export dtype, except bfloat16 (no ONNX Runtime CPU kernels), which is
    written as float16; report.json's onnx.dtype says which one was used."""
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "float16"}[export_dtype]


class OnnxStage:
    def __init__(self, out: Path, dtype: str, opset: int, validate: bool):
        check_opset(opset)
        check_dtype(dtype, None)
        self.dtype, self.opset, self.validate = dtype, opset, validate
        self.work = WorkFolder(out, "dense-onnx")
        self.dense_path: Path | None = None
        self.report: dict = {"opset": opset, "dtype": dtype, "validated": validate}
        self.prompt: torch.Tensor | None = None

    def export_dense(self, model, tokenizer) -> None:
        arch = onnx_arch(model)  # an unsupported architecture is refused before the export starts
        self.report["genai"] = {"type": arch.genai_type, "model_type_known": arch.genai_known}
        if not arch.genai_known:
            self.report["genai"]["note"] = (f"onnxruntime-genai has no model type of its own that serves this graph "
                                            f"for {model.config.model_type!r}; genai_config.json uses its generic "
                                            f"{arch.genai_type!r} type")
        self.dense_path = export_onnx(model, tokenizer, Path(self.work.name) / "dense", self.dtype, self.opset)
        if self.validate:
            self.prompt = prompt_ids(tokenizer)
            self.report["parity"] = {"dense": parity(model, OrtDecoder.load(self.dense_path), self.prompt, self.dtype)}

    def finish(self, model, folder: Path, perplexities: dict | None, eval_ids=None, window: int = 0,
               progress: bool = True, keep_dense: bool = False) -> dict:
        """Write the compressed model.onnx into `folder`; validate; return the report's `onnx` entry.
        Adds `onnx_dense` / `onnx_compressed` to `perplexities` (the report's perplexity block).
        keep_dense: the dense graph stays for a later measurement (throughput) until cleanup()."""
        try:
            path, count = export_compressed(self.dense_path, model, folder)
            self.report.update(file=path.name, rewritten_linears=count)
            if self.validate:
                self._validate(model, path, perplexities, eval_ids, window, progress)
            return self.report
        except BaseException:
            self.cleanup()
            raise
        finally:
            if not keep_dense:
                self.cleanup()

    def cleanup(self) -> None:
        self.work.cleanup()

    def _validate(self, model, path: Path, perplexities, eval_ids, window, progress) -> None:
        compressed = OrtDecoder.load(path)
        self.report["parity"]["compressed"] = parity(model, compressed, self.prompt, self.dtype)
        self.report["provider"] = compressed.provider
        failures = [f"{kind} logits/greedy parity (max |diff| {p['max_abs_diff']:.3g}, top-1 {p['top1_agreement']:.3f},"
                    f" greedy equal {p['greedy']['equal']})"
                    for kind, p in self.report["parity"].items() if not p["passed"]]
        if eval_ids is not None and perplexities is not None:
            for kind, decoder in (("dense", OrtDecoder.load(self.dense_path)), ("compressed", compressed)):
                ppl = perplexity(decoder.logits_fn(), eval_ids, window, f"perplexity (onnx {kind})", progress)
                perplexities[f"onnx_{kind}"] = ppl
                rel = abs(ppl - perplexities[kind]) / perplexities[kind]
                if rel > PPL_REL_TOLERANCE:
                    failures.append(f"ONNX {kind} perplexity {ppl:.4f} vs PyTorch {perplexities[kind]:.4f} "
                                    f"({rel:.2%} > {PPL_REL_TOLERANCE:.1%})")
        if failures:
            raise ValidationError("ONNX validation failed: " + "; ".join(failures)
                                  + " (--skip-parity writes the artifact without these checks)")
