"""Activations between decoder layers: the only state the layer loop carries from one layer to the next.

A stream is a list of batches of hidden states (host memory, the compute dtype) plus the keyword arguments
the model passes to every decoder layer for that batch (attention mask, rotary cos/sin, positions). The
keyword arguments are the same for every layer, so they are captured once, at layer 0, and batches of
the same shape share one copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..architectures import Architecture, decoder_layers


class _Captured(Exception):
    pass


@dataclass
class Activations:
    hidden: list[torch.Tensor]  # one [batch, seq, hidden] tensor per batch, on the host
    kwargs: list[dict] = field(default_factory=list)  # per batch; equal ones are the same object

    def copy(self) -> "Activations":
        return Activations(list(self.hidden), self.kwargs)

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)


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


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_inputs(model: nn.Module, arch: Architecture, batches: list[torch.Tensor], device,
                   storage="cpu") -> Activations:
    """Run each batch up to decoder layer 0 (embeddings, mask, rotary) and keep what layer 0 receives.
    Only the modules outside the decoder layers need real weights: the layers may still be on `meta`."""
    layer0 = decoder_layers(model, arch)[0]
    captured = Activations([], [])
    distinct: list[dict] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "cache", "use_cache")}
        kw = next((d for d in distinct if _same(d, kw)), None) or (distinct.append(kw) or kw)
        captured.hidden.append(hidden.to(storage))
        captured.kwargs.append(kw)
        raise _Captured

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
            else:
                raise RuntimeError("the model never called its first decoder layer")
    finally:
        handle.remove()
    return captured


def run_batch(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, device) -> torch.Tensor:
    return _first(layer(hidden.to(device), **_move(kwargs, device)))


@torch.no_grad()
def advance(layer: nn.Module, acts: Activations, device) -> None:
    """Replace each batch by the layer's output for it (same storage device and dtype)."""
    for b, kwargs in enumerate(acts.kwargs):
        h = acts.hidden[b]
        acts.hidden[b] = run_batch(layer, h, kwargs, device).to(h.device, h.dtype)
