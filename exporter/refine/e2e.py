"""End-to-end refinement (`--refine e2e`, or `block+e2e` after block refinement): once every decoder layer is
compressed, gradient descent on all the model's low-rank factors at once so that the compressed model's
next-token distribution matches the dense model's on the calibration batches:

    minimise  (1/N) Σ_tokens KL(p_dense ‖ p_θ)        θ = every up/down of every LowRankLinear

The dense distribution needs no copy of the dense model: the layer loop has already carried the calibration
batches through the dense layers (the original stream), and the final norm and lm_head are not compressed,
so p_dense is the model's own head applied to that stream's last hidden states (model/head.py).

The optimisation is refine.optimise, as for block refinement: Adam in float32, held-out calibration batches
for early stopping, the closed-form (or block-refined) factors restored exactly unless both the training and
the held-out objective went down. It backpropagates through the whole model, so it needs the model in memory
(run.whole_model_reason): a float32 copy of the model, a gradient and Adam's two moments per factor, and
one calibration batch's autograd activations through every layer plus its logits (batch × seqlen × vocab,
float32, about three times over for the softmax and its gradient).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Refinement
from ..model.architecture import Architecture, decoder_layers
from ..model.head import head_logits
from .optimise import optimise, split_batches


def kl_to_dense(model: nn.Module, arch: Architecture, ids: torch.Tensor, dense_hidden: torch.Tensor,
                device) -> tuple[torch.Tensor, int]:
    """(Σ over the batch's tokens of KL(p_dense ‖ p_model), number of tokens); `dense_hidden`: the dense
    model's last decoder-layer output on `ids`."""
    dense = F.log_softmax(head_logits(model, arch, dense_hidden, ids, device).to(device), dim=-1)
    student = F.log_softmax(model(input_ids=ids.to(device), use_cache=False).logits.float(), dim=-1)
    return F.kl_div(student, dense, log_target=True, reduction="sum"), ids.numel()


def refine_model(model: nn.Module, arch: Architecture, batches: list[torch.Tensor], dense_hidden: list[torch.Tensor],
                 settings: Refinement, device, export_dtype: torch.dtype) -> dict:
    """Refine every factor of `model` in place (see the module docstring); `dense_hidden[b]`: the dense model's
    last hidden states on `batches[b]`. -> the report entry."""
    train, held = split_batches(len(batches), settings.holdout)
    layers = decoder_layers(model, arch)
    home = next(layers.parameters()).device
    layers.to(device)  # all of them at once: the backward pass runs through the whole model
    try:
        entry = optimise(model, lambda b: kl_to_dense(model, arch, batches[b], dense_hidden[b], device), train, held,
                         settings, seed=len(layers), export_dtype=export_dtype)
    finally:
        layers.to(home)
    return {**entry, "objective": "KL(dense || compressed) per token",
            "matrix_losses": "layers.*.loss are of the factors before end-to-end refinement"}
