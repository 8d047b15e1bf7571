"""Architecture knowledge as data: where the decoder layers are and which linears share an input.

A new architecture is one entry in ARCHITECTURES. Each group lists linears that read the same input
tensor (q/k/v; gate/up): their X Xᵀ is accumulated once. `kind` names the matrix type used to group
matrices across layers (SVD-LLM V2's allocation groups by type).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class InputGroup:
    linears: tuple[str, ...]  # paths relative to the decoder layer, sharing one input


@dataclass(frozen=True)
class Architecture:
    layers: str  # path from the causal-LM model to the ModuleList of decoder layers
    groups: tuple[InputGroup, ...]

    def linear_names(self) -> list[str]:
        return [name for g in self.groups for name in g.linears]


def _g(*names: str) -> InputGroup:
    return InputGroup(tuple(names))


LLAMA = Architecture(
    layers="model.layers",
    groups=(
        _g("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        _g("self_attn.o_proj"),
        _g("mlp.gate_proj", "mlp.up_proj"),
        _g("mlp.down_proj"),
    ),
)
OPT = Architecture(
    layers="model.decoder.layers",
    groups=(
        _g("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        _g("self_attn.out_proj"),
        _g("fc1"),
        _g("fc2"),
    ),
)

# model_type (config.model_type) -> architecture
ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "opt": OPT,
}


def architecture_of(model: nn.Module) -> Architecture:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    return model.get_submodule(arch.layers)


def matrix_kind(linear_path: str) -> str:
    """'self_attn.q_proj' -> 'q_proj': the type SVD-LLM V2 groups matrices by."""
    return linear_path.rsplit(".", 1)[-1]
