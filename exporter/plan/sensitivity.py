"""How much the LM loss cares about each linear's output: w_i = mean over calibration tokens and output
features of (∂L/∂y_i)², L the summed next-token cross-entropy of the original model.

Why this number: truncating W_i perturbs its output by ΔY_i. To second order the loss grows by
½ ΔYᵀ H ΔY, and the empirical Fisher E[g gᵀ] (g = ∂L/∂y per token) stands in for H; taking only its trace
per output feature gives ΔL ≈ ½ w_i ‖ΔY_i‖_F², the truncation error in units of the network's loss. The
summed loss keeps the scale of a per-token gradient independent of the batch size.

How, one decoder layer at a time (the layer loop's bound, so a streamed 70B model allocates with it too): a
forward walk over the layers keeps every layer's input for a group of batches (host memory); the head turns
the last layer's output into ∂L/∂h; a reverse walk runs each layer again on its kept input, with gradients,
and carries ∂L/∂h down to the layer below, the linears' output gradients hooked on the way. Each layer is
materialised twice per group, and the backward through a layer costs its forward again (as activation
checkpointing does): ≈ 4 forwards per batch. No parameter requires grad, so no weight gradient is stored.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import dist
from ..factorize.gradients import grad_only_for
from ..load.source import LayerSource
from ..model.activations import Activations, run_batch
from ..model.candidates import Matrix
from ..model.head import head_forward

HEAD_CHUNK = 256  # positions whose logits exist at once in the head's backward (batch × HEAD_CHUNK × vocab)
KEPT_INPUTS_SHARE = 0.5  # of the host memory available when the pass starts (per process on this host): the
# layer inputs one group of batches keeps


def output_gradient_sensitivity(source: LayerSource, calib: Activations, batches: list[torch.Tensor],
                                matrices: list[Matrix], host_budget: int | None = None) -> dict[str, float]:
    """{matrix name: mean (∂L/∂y)²}, summed in float64 over every batch. `calib`: decoder layer 0's inputs of
    `batches` (the token ids) and every layer's keyword arguments. `host_budget`: bytes the kept layer inputs of
    one group of batches may take (default: KEPT_INPUTS_SHARE of the available host memory); a group is one
    batch at least."""
    layers = source.num_layers
    per_batch = max(h.numel() * h.element_size() for h in calib.hidden) * (layers + 1)  # every input, the output
    if host_budget is None:  # under torchrun the processes on this host share it
        from ..load.open import available_bytes
        sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        host_budget = int(available_bytes(torch.device("cpu")) * KEPT_INPUTS_SHARE / sharing)
    group = max(1, min(len(batches), host_budget // per_batch))
    sums = {m.name: torch.zeros((), dtype=torch.float64, device=source.device) for m in matrices}
    counts = dict.fromkeys(sums, 0)
    by_layer = {i: [m.name for m in matrices if m.name.startswith(source.layer_prefix(i))] for i in range(layers)}
    outside = set(sums) - {name for names in by_layer.values() for name in names}
    if outside:  # the allocations plan decoder-layer linears only (model/candidates.py)
        raise ValueError(f"the sensitivity pass reaches decoder-layer linears only, not {sorted(outside)[0]}")
    for first in range(0, len(batches), group):
        members = range(first, min(first + group, len(batches)))
        kept, grads = _forward(source, calib, members)
        grads = [_head_gradient(source, h, batches[b]) for h, b in zip(grads, members)]
        for i in reversed(range(layers)):
            layer = source.materialize(i)
            try:
                grads = _layer_backward(source, i, layer, kept.pop(i), grads, calib, members, by_layer[i], sums, counts)
            finally:
                source.release(i)
    names = list(sums)  # under torchrun: the sums over every rank's batches
    totals = dict(zip(names, dist.sum_floats(*[float(sums[n]) for n in names])))
    counts = dict(zip(names, dist.sum_floats(*[counts[n] for n in names])))
    never = [name for name, c in counts.items() if c == 0]
    if never:
        raise RuntimeError(f"the sensitivity pass never reached {len(never)} linears, e.g. {never[0]}")
    return {name: totals[name] / counts[name] for name in names}


@torch.no_grad()
def _forward(source: LayerSource, calib: Activations, members: range) -> tuple[dict, list[torch.Tensor]]:
    """({layer: its inputs for the group's batches, on the host}, the last layer's outputs)."""
    kept, hidden = {}, [calib.hidden[b] for b in members]
    for i in range(source.num_layers):
        layer = source.materialize(i)
        try:
            kept[i] = hidden
            kwargs = calib.kwargs_for(i)
            hidden = [run_batch(layer, h, kwargs[b], source.device).to(h.device, h.dtype) for h, b in zip(hidden, members)]
        finally:
            source.release(i)
    return kept, hidden


def _head_gradient(source: LayerSource, final: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """∂L/∂(last layer's output) of one batch (host, its dtype), L the summed next-token cross-entropy through
    the model's own head (final norm, lm_head), HEAD_CHUNK positions at a time."""
    leaf = final.to(source.device).detach().requires_grad_(True)
    with torch.enable_grad(), grad_only_for(source.model):
        for start in range(0, ids.shape[1] - 1, HEAD_CHUNK):
            part = slice(start, min(start + HEAD_CHUNK, ids.shape[1] - 1))
            logits = head_forward(source.model, source.arch, leaf[:, part], ids[:, part], source.device).float()
            target = ids[:, part.start + 1:part.stop + 1].to(source.device)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
            if not torch.isfinite(loss):
                raise FloatingPointError("non-finite LM loss in the sensitivity pass: the model overflowed in its dtype")
            loss.backward()
    return leaf.grad.to(final.device, final.dtype)


def _layer_backward(source: LayerSource, i: int, layer, inputs: list[torch.Tensor], grads: list[torch.Tensor],
                    calib: Activations, members: range, names: list[str], sums: dict, counts: dict) -> list[torch.Tensor]:
    """Decoder layer `i` run again on its kept `inputs` and back-propagated from `grads` (∂L/∂its output),
    each named linear's (∂L/∂y)² added to `sums`. -> ∂L/∂its inputs."""
    prefix = source.layer_prefix(i)

    def on_output(name):
        def grad_hook(g):
            sums[name] += g.detach().to(torch.float64).square().sum()
            counts[name] += g.numel()

        def forward_hook(_module, _args, out):
            out.register_hook(grad_hook)
        return forward_hook

    handles = [layer.get_submodule(name[len(prefix):]).register_forward_hook(on_output(name)) for name in names]
    below = []
    try:
        with torch.enable_grad(), grad_only_for(layer):
            kwargs = calib.kwargs_for(i)
            for h, g, b in zip(inputs, grads, members):
                leaf = h.to(source.device).detach().requires_grad_(True)  # never flag the kept tensor itself
                out = run_batch(layer, leaf, kwargs[b], source.device)
                out.backward(g.to(out.device, out.dtype))
                below.append(leaf.grad.to(h.device, h.dtype))
    finally:
        for handle in handles:
            handle.remove()
    return below
