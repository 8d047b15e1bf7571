"""The low-rank replacement of nn.Linear and the module swap.

x -> x·downᵀ (rank×in) -> ·upᵀ (out×rank) + bias. Two plain nn.Linear children, so that every exporter
(ONNX included) emits a pair of MatMuls without any custom op, and the state dict has ordinary names:
`<module>.down.weight`, `<module>.up.weight`, `<module>.up.bias`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .linears import is_linear, linear_dims, linear_weight


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 device=None, dtype=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype, device) -> "LowRankLinear":
        """up: out×rank, down: rank×in (W ≈ up @ down)."""
        out_features, rank = up.shape
        module = cls(down.shape[1], out_features, rank, bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            module.up.weight.copy_(up)
            module.down.weight.copy_(down)
            if bias is not None:
                module.up.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def swap_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where `name` is, in the mode of the module it replaces: a new nn.Module is in training
    mode, and one left so inside an eval model is state the reloaded artifact (all eval) does not have."""
    module.train(root.get_submodule(name).training)
    root.set_submodule(name, module)


def build_skeleton(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each named linear (nn.Linear or Conv1D) by an (uninitialised) LowRankLinear of the given
    rank, in place. Used to rebuild a saved compressed model before its state dict is loaded."""
    for name, rank in ranks.items():
        old = model.get_submodule(name)
        if not is_linear(old):
            raise ValueError(f"{name} is {type(old).__name__}, expected a linear layer")
        out_features, in_features = linear_dims(old)
        weight = linear_weight(old)
        swap_module(model, name, LowRankLinear(in_features, out_features, rank, old.bias is not None,
                                               device=weight.device, dtype=weight.dtype))


def trained_weight(linear: nn.Linear) -> nn.Parameter:
    """The parameter an optimiser trains for `linear`'s weight: the weight itself, or the float original under a
    parametrization (refinement's rounded forward, exporter/quantize/fake.py)."""
    parametrizations = getattr(linear, "parametrizations", None)
    return linear.weight if parametrizations is None else parametrizations.weight.original
