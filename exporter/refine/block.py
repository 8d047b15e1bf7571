"""Block refinement (`--refine block`): after the closed-form factorization of one decoder layer, gradient
descent on that layer's low-rank factors so that the compressed layer, fed the calibration inputs propagated
through the already-compressed prefix (X_c), reproduces the dense layer's output on the original inputs:

    minimise  L(θ) = (1/N) Σ_tokens ‖layer_θ(X_c) − layer_dense(X_o)‖²       θ = every up/down of the layer

It is adaComp made nonlinear and layer-wide: the attention softmax, the MLP activation and the residual are
inside the objective, and all the layer's factors move together. What it needs is already in the layer
loop: the compressed stream's inputs (before they advance) and the original stream's outputs (observe has
just advanced it through the dense layer). Memory: one layer's autograd activations for one calibration
batch, in float32, on top of the streams the loop keeps anyway.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import Refinement
from ..model.activations import Activations, run_batch
from .optimise import mean_error, optimise, split_batches


def _squared_error(index: int, layer, inputs: Activations, targets: Activations, b: int,
                   device) -> tuple[torch.Tensor, int]:
    """(Σ over the batch's tokens of ‖layer(X_c) − target‖², number of tokens), float32. `index`: the decoder
    layer's position, which picks the keyword arguments the model gives it (masks, rotary tables)."""
    out = run_batch(layer, inputs.hidden[b], inputs.kwargs_for(index)[b], device).float()
    target = targets.hidden[b].to(device).float()
    return (out - target).square().sum(), target.shape[0] * target.shape[1]


def objective(index: int, layer, inputs: Activations, targets: Activations, batches: list[int], device) -> float:
    """Block refinement's objective: mean squared error per token of the layer's output over `batches`."""
    return mean_error(lambda b: _squared_error(index, layer, inputs, targets, b, device), batches)


def refine_layer(index: int, layer: nn.Module, inputs: Activations, targets: Activations, settings: Refinement,
                 device, export_dtype: torch.dtype) -> dict:
    """Refine the factors of `layer` in place (see the module docstring). `inputs`: the compressed stream at the
    layer's input; `targets`: the dense layer's outputs on the original stream. -> the report entry."""
    train, held = split_batches(len(inputs.hidden), settings.holdout)
    return optimise(layer, lambda forward, b: _squared_error(index, forward, inputs, targets, b, device), train, held,
                    settings, seed=index, export_dtype=export_dtype)
