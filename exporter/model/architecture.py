"""Where the decoder layers are and which linears share an input: discovered (exporter/model/discovery.py),
with ARCHITECTURES as overrides for what discovery cannot see.

Each group lists linears that read the same input tensor (q/k/v; gate/up): their X Xᵀ is accumulated
once. A group is `routed` when its input is the tokens a router sent to one expert: it may see no token
in a batch, or none at all. The matrix type that per-type allocations group by is the linear's path
inside the decoder layer, with expert indices dropped (every expert's down_proj is one type).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class InputGroup:
    linears: tuple[str, ...]  # paths relative to the decoder layer, sharing one input
    routed: bool = False  # the input is the tokens routed to one expert (maybe none)


@dataclass(frozen=True)
class Architecture:
    layers: str  # path from the causal-LM model to the ModuleList of decoder layers
    groups: tuple[InputGroup, ...]  # the groups of every decoder layer (of layer 0 when per_layer is set)
    per_layer: tuple[tuple[InputGroup, ...], ...] | None = None  # each layer's groups, when layers differ

    def groups_of(self, layer: int) -> tuple[InputGroup, ...]:
        return self.groups if self.per_layer is None else self.per_layer[layer]

    def linear_names(self, layer: int = 0) -> list[str]:
        return [name for g in self.groups_of(layer) for name in g.linears]

    def matrix_kind(self, linear_path: str) -> str:
        return matrix_kind(linear_path)


# model_type (config.model_type) -> architecture, for a family whose structure discovery gets wrong.
# No family needs one today: a new entry comes with a test showing what discovery misses.
ARCHITECTURES: dict[str, Architecture] = {}


def decoder_layers(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    return model.get_submodule(arch.layers)


def matrix_kind(linear_path: str) -> str:
    """'self_attn.q_proj' -> 'self_attn.q_proj'; 'mlp.experts.3.down_proj' -> 'mlp.experts.down_proj'."""
    return ".".join(part for part in linear_path.split(".") if not part.isdigit())
