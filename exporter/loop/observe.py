"""Statistics of one decoder layer's linear inputs, gathered while the calibration streams pass through it.

Hooks record the input of the first linear of each input group (arch.groups: q/k/v share one input, so
one X Xᵀ serves all three). Two streams (AdaSVD's propagation):
  - original: inputs propagated through the original layers;
  - compressed: inputs propagated through the already-compressed layers; its statistics pair each token's
    X_c with the X_o of the same token (adaComp's cross moments).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist
from ..factorize.stats import InputStats
from ..model.activations import Activations, run_batch
from ..model.architecture import Architecture, InputGroup
from ..model.linears import linear_dims, linear_weight


@contextmanager
def capture_linear_inputs(layer: nn.Module, groups: tuple[InputGroup, ...]):
    """Record the input of the first linear of each input group on every forward of `layer`. A routed
    group (one MoE expert) is absent when no token reached it: clear `seen` before each forward."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for gi, group in enumerate(groups):
        def hook(_m, args, gi=gi):
            seen[gi] = args[0].detach()
        handles.append(layer.get_submodule(group.linears[0]).register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@dataclass
class Observation:
    stats: list[InputStats]  # one per input group (arch.groups_of(layer) order); count 0: never reached
    input_similarity: float  # mean cosine similarity of the layer's input and output (original stream)
    dense_on_compressed: list[torch.Tensor] | None = None  # the dense layer's outputs on the compressed stream


@torch.no_grad()
def observe(index: int, layer: nn.Module, arch: Architecture, original: Activations, device,
            compressed: Activations | None = None, need_abs_mean: bool = False, need_cross: bool = False,
            need_moments: bool = True, keep_dense_on_compressed: bool = False) -> Observation:
    """Statistics of decoder layer `index`'s linear inputs; advances `original` through the (still dense)
    layer. With `compressed`, the statistics come from that stream, which the caller advances after the swap.
    `need_moments=False`: token counts only (which linears the data reached), no X Xᵀ.
    `keep_dense_on_compressed`: keep the (still dense) layer's outputs on the compressed stream, computed for
    the statistics anyway (block refinement's blended target)."""
    groups = arch.groups_of(index)
    if need_cross and compressed is None:
        raise ValueError("cross statistics (adaComp) need propagation through the compressed layers")
    if need_cross and any(g.routed for g in groups):
        raise ValueError("cross statistics (adaComp) pair each token's two inputs, but MoE experts route the "
                         "original and the compressed stream differently; use a method without adaComp")
    dims = [linear_dims(layer.get_submodule(g.linears[0]))[1] for g in groups]
    # adaComp's objective needs ‖W X_o‖² of each linear, keyed by its full name (as compress names it)
    targets = [{f"{arch.layers}.{index}.{path}": linear_weight(layer.get_submodule(path)).detach()
                for path in g.linears} if need_cross else None for g in groups]
    stats = [InputStats(d, device, abs_mean=need_abs_mean, cross=need_cross, targets=t, moments=need_moments)
             for d, t in zip(dims, targets)]
    cos_sum, cos_count = 0.0, 0
    kept = [] if keep_dense_on_compressed else None
    with capture_linear_inputs(layer, groups) as seen:
        for b, kwargs in enumerate(original.kwargs_for(index)):
            x = original.hidden[b]
            seen.clear()
            out = run_batch(layer, x, kwargs, device)
            cos_sum += float(F.cosine_similarity(x.to(device).float(), out.float(), dim=-1).sum())
            cos_count += x.shape[0] * x.shape[1]
            original.hidden[b] = out.to(x.device, x.dtype)
            if compressed is not None:
                seen_orig = dict(seen)
                seen.clear()
                dense_out = run_batch(layer, compressed.hidden[b], kwargs, device)
                if kept is not None:
                    kept.append(dense_out.to(x.device, x.dtype))
                for gi, x_seen in seen.items():
                    stats[gi].add(x_seen, seen_orig[gi] if need_cross else None)
            else:
                for gi, x_seen in seen.items():
                    stats[gi].add(x_seen)
    for s in stats:  # under torchrun: the statistics of every rank's batches
        s.reduce_across_ranks()
    cos_sum, cos_count = dist.sum_floats(cos_sum, cos_count)
    return Observation(stats, cos_sum / max(cos_count, 1), kept)  # guard: an empty stream has no similarity


def linears_with_stats(arch: Architecture, index: int, layer: nn.Module, obs):
    """(full name, path in the layer, module, input statistics) of every candidate linear of one layer."""
    for group, stats in zip(arch.groups_of(index), obs.stats):
        for path in group.linears:
            yield f"{arch.layers}.{index}.{path}", path, layer.get_submodule(path), stats
