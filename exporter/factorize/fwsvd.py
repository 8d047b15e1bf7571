"""FWSVD (Hsu et al. 2022), Fisher-weighted SVD: weight each input column of W by √(Fisher information),
the squared gradient of the LM loss on the calibration set averaged over W's rows (the column
convention of ASVD4LLM, the implementation the AdaSVD paper compares against), SVD, unscale.

Memory: the Fisher pass is one forward + backward of the WHOLE model per calibration batch, so it needs
the whole model on the compute device plus the autograd activations of every layer for one batch
(∝ batch × seqlen × hidden × layers, plus attention) — far more than the layer-by-layer loop, which
keeps one layer. Gradients are only enabled on the compressed weights, and a hook folds each weight's
gradient into a length-`in` vector and frees it the moment it is accumulated, so at most one weight
gradient (in float64 while being squared) is alive at a time instead of a full gradient copy of the model.
"""
from __future__ import annotations

import torch

from .. import dist
from ..model.architecture import decoder_layers
from ..model.discovery import architecture_of
from .asvd import column_scaled_svd
from .base import MatrixInput, Method, register
from .gradients import grad_only_for, lm_loss_backward


def fisher_columns(model, batches, names: list[str], device) -> dict[str, torch.Tensor]:
    """{module name: Σ_batches mean_rows (∂L/∂W)²}, one float64 value per input column; L is the summed
    next-token loss (a common scale of all columns does not change the truncation)."""
    layers = decoder_layers(model, architecture_of(model))
    homes = [next(layer.parameters()).device for layer in layers]
    weights = {name: model.get_submodule(name).weight for name in names}
    fisher = {name: torch.zeros(w.shape[1], dtype=torch.float64, device=device) for name, w in weights.items()}

    def fold(name):
        def hook(param):
            fisher[name] += param.grad.detach().to(torch.float64).square().mean(0)
            param.grad = None  # free it now: one weight gradient alive at a time
        return hook

    handles = [w.register_post_accumulate_grad_hook(fold(name)) for name, w in weights.items()]
    try:
        layers.to(device)
        with grad_only_for(model, weights.values()):
            lm_loss_backward(model, batches, device, "Fisher pass")
    finally:
        for h in handles:
            h.remove()
        for w in weights.values():  # after an error mid-backward, a gradient may be left unfolded
            w.grad = None
        for layer, home in zip(layers, homes):
            layer.to(home)
    for column_sums in fisher.values():  # under torchrun: the sums over every rank's batches
        dist.all_reduce_(column_sums)
    return fisher


@register
class FWSVD(Method):
    name = "fwsvd"

    def __init__(self, **_):
        self.fisher: dict[str, torch.Tensor] = {}

    def prepare(self, model, batches, matrices, device) -> None:
        self.fisher = fisher_columns(model, batches, [m.name for m in matrices], device)

    def factorize(self, m: MatrixInput, rank: int):
        if m.name not in self.fisher:
            raise KeyError(f"no Fisher information for {m.name}: prepare() did not see it")
        return column_scaled_svd(m.weight, self.fisher[m.name].sqrt(), rank)
