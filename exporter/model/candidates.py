"""The compression candidates of a model: every linear of every decoder layer that discovery found (its
input groups), described by name, matrix type, layer and shape — what the allocations and the parameter
counts work on, without touching a weight (a meta skeleton will do)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .architecture import Architecture, decoder_layers, matrix_kind
from .linears import linear_dims


@dataclass(frozen=True)
class Matrix:
    name: str  # full module name, e.g. model.layers.3.self_attn.q_proj
    kind: str  # matrix type shared across layers, e.g. q_proj
    layer: int
    out_features: int
    in_features: int

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def params_per_rank(self) -> int:
        return self.out_features + self.in_features


def list_matrices(model: nn.Module, arch: Architecture, skip: tuple[str, ...] = ()) -> list[Matrix]:
    out = []
    for i, layer in enumerate(decoder_layers(model, arch)):
        for path in arch.linear_names(i):
            name = f"{arch.layers}.{i}.{path}"
            if any(s in name for s in skip):
                continue
            out.append(Matrix(name, matrix_kind(path), i, *linear_dims(layer.get_submodule(path))))
    return out
