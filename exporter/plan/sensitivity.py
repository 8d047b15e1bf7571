"""How much the LM loss cares about each linear's output: w_i = mean over calibration tokens and output
features of (∂L/∂y_i)², L the summed next-token cross-entropy of the original model.

Why this number: truncating W_i perturbs its output by ΔY_i. To second order the loss grows by
½ ΔYᵀ H ΔY, and the empirical Fisher E[g gᵀ] (g = ∂L/∂y per token) stands in for H; taking only its trace
per output feature gives ΔL ≈ ½ w_i ‖ΔY_i‖_F², the truncation error in units of the network's loss. The
summed loss keeps the scale of a per-token gradient independent of the batch size.

Cost: one forward + backward of the whole model per calibration batch (≈ 3 forwards). Parameters do not
require grad during the pass, so no weight gradient is ever stored; the peak memory is the model plus the
activations one batch needs for its backward (use a small --calib-batch-size on a large model).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import dist
from ..factorize.gradients import grad_only_for, lm_loss_backward
from ..model.candidates import Matrix


def output_gradient_sensitivity(model: nn.Module, batches: list[torch.Tensor], matrices: list[Matrix],
                                device) -> dict[str, float]:
    """{matrix name: mean (∂L/∂y)²}, accumulated in float64 over every batch. The model must fit on `device`."""
    sums = {m.name: torch.zeros((), dtype=torch.float64, device=device) for m in matrices}
    counts = dict.fromkeys(sums, 0)

    def on_output(name):
        def grad_hook(g):
            sums[name] += g.detach().to(torch.float64).square().sum()
            counts[name] += g.numel()

        def forward_hook(_module, _args, out):
            out.register_hook(grad_hook)
        return forward_hook

    # Gradients must start flowing at the embeddings, since no parameter requires grad.
    def embeddings_require_grad(_module, _args, out):
        return out.requires_grad_(True)

    handles = [model.get_submodule(name).register_forward_hook(on_output(name)) for name in sums]
    handles.append(model.get_input_embeddings().register_forward_hook(embeddings_require_grad))
    try:
        with grad_only_for(model):
            lm_loss_backward(model, batches, device, "sensitivity pass")
    finally:
        for h in handles:
            h.remove()
    names = list(sums)  # under torchrun: the sums over every rank's batches
    totals = dict(zip(names, dist.sum_floats(*[float(sums[n]) for n in names])))
    counts = dict(zip(names, dist.sum_floats(*[counts[n] for n in names])))
    never = [name for name, c in counts.items() if c == 0]
    if never:
        raise RuntimeError(f"the sensitivity pass never reached {len(never)} linears, e.g. {never[0]}")
    return {name: totals[name] / counts[name] for name in names}


def pass_bytes(model: nn.Module, batch: int, seqlen: int, compute_bytes: int) -> int:
    """What the sensitivity pass holds at its peak (a meta skeleton will do): every weight in the compute dtype,
    and the activations one batch keeps for its backward in every decoder layer (no checkpointing: the layer's
    inputs, the attention and MLP intermediates, the attention scores, materialised as the CPU kernels do)."""
    config = model.config.get_text_config()
    widest = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * config.hidden_size
    per_layer = (batch * seqlen * (10 * config.hidden_size + 4 * widest)
                 + batch * config.num_attention_heads * seqlen ** 2)
    weights = sum(p.numel() for p in model.parameters())
    return (weights + config.num_hidden_layers * per_layer) * compute_bytes
