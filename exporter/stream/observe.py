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

from ..architectures import Architecture
from ..calibration.stats import InputStats
from .activations import Activations, run_batch


@contextmanager
def capture_linear_inputs(layer: nn.Module, arch: Architecture):
    """Record the input of the first linear of each input group on every forward of `layer`."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for gi, group in enumerate(arch.groups):
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
    stats: list[InputStats]  # one per input group (arch.groups order)
    input_similarity: float  # mean cosine similarity of the layer's input and output (original stream)


@torch.no_grad()
def observe(layer: nn.Module, arch: Architecture, original: Activations, device,
            compressed: Activations | None = None, need_abs_mean: bool = False, need_cross: bool = False) -> Observation:
    """Statistics of `layer`'s linear inputs; advances `original` through the (still dense) layer.
    With `compressed`, the statistics come from that stream, which the caller advances after the swap."""
    if need_cross and compressed is None:
        raise ValueError("cross statistics (adaComp) need propagation through the compressed layers")
    dims = [layer.get_submodule(g.linears[0]).in_features for g in arch.groups]
    stats = [InputStats(d, device, abs_mean=need_abs_mean, cross=need_cross) for d in dims]
    cos_sum, cos_count = 0.0, 0
    with capture_linear_inputs(layer, arch) as seen:
        for b, kwargs in enumerate(original.kwargs):
            x = original.hidden[b]
            out = run_batch(layer, x, kwargs, device)
            cos_sum += float(F.cosine_similarity(x.to(device).float(), out.float(), dim=-1).sum())
            cos_count += x.shape[0] * x.shape[1]
            original.hidden[b] = out.to(x.device, x.dtype)
            if compressed is not None:
                seen_orig = dict(seen)
                run_batch(layer, compressed.hidden[b], kwargs, device)
                for gi, s in enumerate(stats):
                    s.add(seen[gi], seen_orig[gi] if need_cross else None)
            else:
                for gi, s in enumerate(stats):
                    s.add(seen[gi])
    return Observation(stats, cos_sum / max(cos_count, 1))  # guard: an empty stream has no similarity
