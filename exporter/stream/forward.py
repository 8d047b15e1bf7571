"""A plain forward pass of a few token sequences through a layer source, one decoder layer at a time: the
PyTorch reference that validation compares ONNX Runtime against, at any model size."""
from __future__ import annotations

import torch

from ..source import LayerSource
from .activations import advance, capture_inputs
from .head import head_logits


@torch.no_grad()
def source_logits(source: LayerSource, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits [batch, seq, vocab] (float32, host) of each id tensor [batch, seq] in `sequences`."""
    acts = capture_inputs(source.model, source.arch, sequences, source.device)
    for i, layer in source.layers():
        advance(i, layer, acts, source.device)
    return [head_logits(source.model, source.arch, h, ids, source.device) for h, ids in zip(acts.hidden, sequences)]
