"""A model that is already in memory. Its decoder layers stay where they live (host or device); a layer
living elsewhere than the compute device visits the device for its turn and goes back home after."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..model.architecture import Architecture, decoder_layers
from ..model.discovery import prepare
from .source import LayerSource


def place_outside_layers(model: nn.Module, arch: Architecture, device) -> None:
    """Move every parameter and buffer that is not inside a decoder layer (embeddings, norms, rotary)."""
    prefix = arch.layers + "."
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(prefix):
            p.data = p.data.to(device)


class ResidentSource(LayerSource):
    def __init__(self, model: nn.Module, device=None, arch: Architecture | None = None):
        self.model = model.eval()
        self.arch = arch or prepare(model)  # MoE experts become per-expert linears (an equivalent model)
        first = next(decoder_layers(model, self.arch)[0].parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.compute_dtype = first.dtype
        self._home = first.device
        place_outside_layers(model, self.arch, self.device)

    def materialize(self, i: int) -> nn.Module:
        return decoder_layers(self.model, self.arch)[i].to(self.device)

    def release(self, i: int) -> None:
        if self._home != self.device:
            decoder_layers(self.model, self.arch)[i].to(self._home)
