"""A plain forward pass of a few token sequences through a layer source, one decoder layer at a time: the
PyTorch reference that validation compares ONNX Runtime against, at any model size."""
from __future__ import annotations

import torch

from ..load.source import LayerSource
from ..model.activations import advance
from ..model.head import head_logits
from ..model.layer_inputs import capture_inputs
from .walk import layer_by_layer


@torch.no_grad()
def source_logits(source: LayerSource, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits [batch, seq, vocab] (float32, host) of each id tensor [batch, seq] in `sequences`."""
    acts = capture_inputs(source.model, source.arch, sequences, source.device)
    for i, layer in layer_by_layer(source):
        advance(i, layer, acts, source.device)
    return [head_logits(source.model, source.arch, h, ids, source.device) for h, ids in zip(acts.hidden, sequences)]
