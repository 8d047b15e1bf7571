"""THE layer loop (GPTQ-style): capture the inputs of decoder layer 0, then layer by layer:
observe the linears' inputs → let a visitor compress the layer → pass the activations on.

Only one decoder layer's statistics are alive at a time, and only the current layer needs to sit
on the compute device. Two activation streams:
  - original: inputs propagated through the original layers (SVD-LLM v1's choice);
  - compressed: inputs propagated through the already-compressed layers (AdaSVD's adaComp target
    pairs these with the original stream, token for token).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..architectures import Architecture, InputGroup, decoder_layers
from ..linears import linear_dims
from .layer_inputs import LayerInputs, capture_layer_inputs
from .stats import InputStats


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def place_outside_layers(model: nn.Module, arch: Architecture, device) -> None:
    """Move every parameter and buffer that is not inside a decoder layer (embeddings, norms, rotary)."""
    prefix = arch.layers + "."
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(prefix):
            p.data = p.data.to(device)


def capture_layer0_inputs(model: nn.Module, arch: Architecture, batches: list[torch.Tensor], device,
                          storage="cpu") -> LayerInputs:
    """Layer 0's hidden states and every layer's own keyword arguments (calibration/layer_inputs.py)."""
    return capture_layer_inputs(model, decoder_layers(model, arch), batches, device, storage)


@contextmanager
def capture_linear_inputs(layer: nn.Module, groups: tuple[InputGroup, ...]):
    """Record the input of the first linear of each input group on every forward of `layer`. A routed
    group (one expert) is absent when no token reached it: clear `seen` before each forward."""
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


def _run(layer, hidden, kwargs, device):
    return _first(layer(hidden.to(device), **_move(kwargs, device)))


@dataclass
class LayerObservation:
    index: int
    layer: nn.Module
    stats: list[InputStats]  # one per input group (arch.groups_of(index) order); count 0: never reached
    input_similarity: float  # mean cosine similarity of the layer's input and output (original stream)


# visitor(observation) is called once per layer, after statistics and before the activations move on;
# it may swap modules inside observation.layer.
Visitor = Callable[[LayerObservation], None]


@torch.no_grad()
def run_layers(model: nn.Module, arch: Architecture, inputs: LayerInputs, visit: Visitor, device,
               propagate: str = "original", need_abs_mean: bool = False, need_cross: bool = False,
               progress: Callable | None = None, offload: str | None = None) -> None:
    """Walk the decoder layers once. `propagate` picks the stream the statistics come from and that the
    next layer sees: "original" (through unmodified layers) or "compressed" (through the visited layers)."""
    if propagate not in ("original", "compressed"):
        raise ValueError(f"propagate must be 'original' or 'compressed', got {propagate!r}")
    two_streams = propagate == "compressed"
    if need_cross and not two_streams:
        raise ValueError("cross statistics (adaComp) need propagation through the compressed layers")
    layers = decoder_layers(model, arch)
    storage = inputs.hidden[0].device
    orig = list(inputs.hidden)
    comp = list(inputs.hidden) if two_streams else None
    indices = range(len(layers))
    for i in (progress(indices) if progress else indices):
        layer = layers[i].to(device)
        groups = arch.groups_of(i)
        if need_cross and any(g.routed for g in groups):
            raise ValueError("cross statistics (adaComp) pair each token's two inputs, but MoE experts route the "
                             "original and the compressed stream differently; use a method without adaComp")
        dims = [linear_dims(layer.get_submodule(g.linears[0]))[1] for g in groups]
        stats = [InputStats(d, device, abs_mean=need_abs_mean, cross=need_cross) for d in dims]
        next_orig, cos_sum, cos_count = [], 0.0, 0
        layer_kwargs = inputs.kwargs_for(i)
        with capture_linear_inputs(layer, groups) as seen:
            for b, kwargs in enumerate(layer_kwargs):
                seen.clear()
                out = _run(layer, orig[b], kwargs, device)
                x = orig[b].to(device)
                cos_sum += float(torch.nn.functional.cosine_similarity(x.float(), out.float(), dim=-1).sum())
                cos_count += x.shape[0] * x.shape[1]
                next_orig.append(out.to(storage))
                if two_streams:
                    seen_orig = dict(seen)
                    seen.clear()
                    _run(layer, comp[b], kwargs, device)
                    for gi, seen_x in seen.items():
                        stats[gi].add(seen_x, seen_orig[gi] if need_cross else None)
                else:
                    for gi, seen_x in seen.items():
                        stats[gi].add(seen_x)
        visit(LayerObservation(i, layer, stats, cos_sum / max(cos_count, 1)))
        del stats
        if two_streams:
            comp = [_run(layer, comp[b], kw, device).to(storage) for b, kw in enumerate(layer_kwargs)]
        orig = next_orig
        if offload is not None:
            layers[i].to(offload)
