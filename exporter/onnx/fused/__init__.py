"""The fused ONNX decoder, built directly from the weights (no tracing), one decoder layer at a time.

    family.py       what each model family is made of (data) and what is refused
    weight_file.py  the external data file, written as tensors arrive
    graph.py        node/initializer helper on onnx-ir
    linear.py       nn.Linear / LowRankLinear → MatMul(s) or MatMulNBits, tagged
    quantize.py     one weight → MatMulNBits inputs (ONNX Runtime's block quantizer)
    embedding.py    the token table → GatherBlockQuantized, one packed table with a tied lm_head
    norms.py        (Skip)(Simplified)LayerNormalization
    rotary.py       cos/sin caches as transformers computes them
    attention.py    GroupQueryAttention with past/present KV
    mlp.py          gated SiLU (QuickGelu) / ReLU feed-forward
    writer.py       FusedDecoderWriter: the streaming interface
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ...config import Quantization
from ...model.architecture import decoder_layers
from ...model.discovery import architecture_of
from .family import FAMILIES, UnsupportedModel, family_of
from .writer import FusedDecoderWriter

__all__ = ["FAMILIES", "FusedDecoderWriter", "UnsupportedModel", "build_onnx", "family_of"]


def build_onnx(model: nn.Module, tokenizer, folder: str | Path, dtype: str = "float32",
               quantization: Quantization | None = None, opset: int = 18, embedding_bits: int | None = None) -> Path:
    """A resident model through the streaming writer: every decoder layer in turn. -> model.onnx path."""
    writer = FusedDecoderWriter(model.config, folder, dtype, quantization, opset, embedding_bits)
    writer.add_outside(model)
    for index, layer in enumerate(decoder_layers(model, architecture_of(model))):
        writer.add_layer(index, layer)
    return writer.finish(tokenizer, getattr(model, "generation_config", None))
