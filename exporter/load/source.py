"""The interface of a layer source: the model whose decoder layers are materialised one at a time on demand
(exporter/loop/walk.py walks them)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..model.architecture import Architecture, decoder_layers


class LayerSource:
    """model: the causal LM; everything outside the decoder layers is real and on `device`.
    materialize(i) -> decoder layer i with real weights on `device` (compute dtype); release(i) frees it
    (the layer keeps its structure, e.g. the LowRankLinear modules swapped in)."""
    model: nn.Module
    arch: Architecture
    device: torch.device
    compute_dtype: torch.dtype
    streamed: bool = False  # True: at most one decoder layer is ever materialised

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model, self.arch))

    def layer_prefix(self, i: int) -> str:
        return f"{self.arch.layers}.{i}."

    def materialize(self, i: int) -> nn.Module:
        raise NotImplementedError

    def release(self, i: int) -> None:
        raise NotImplementedError
