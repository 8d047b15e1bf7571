"""Activations between decoder layers: the only state the layer loop carries from one layer to the next.

A stream is a list of batches of hidden states (host memory, the compute dtype) plus the keyword arguments
the model passes to each decoder layer for each batch (attention mask, rotary cos/sin, positions), captured
once before the first layer runs (model/layer_inputs.py); equal ones are one shared object.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class Activations:
    hidden: list[torch.Tensor]  # one [batch, seq, hidden] tensor per batch, on the host
    layer_kwargs: list[list[dict]] = field(default_factory=list)  # [layer][batch]; equal dicts are one object

    def kwargs_for(self, layer: int) -> list[dict]:
        """The keyword arguments the model gives decoder layer `layer`, one dict per batch."""
        return self.layer_kwargs[layer]

    def copy(self) -> "Activations":
        return Activations(list(self.hidden), self.layer_kwargs)

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


def shared_across_batches(layer_kwargs: list[list[dict]]) -> list[list[dict]]:
    """Batches of one shape get equal masks and rotary tables: keep one copy (hundreds of evaluation windows
    would otherwise each hold their own)."""
    distinct: list[dict] = []
    out = []
    for per_batch in layer_kwargs:
        row = []
        for kw in per_batch:
            same = next((d for d in distinct if d is kw or _same(d, kw)), None)
            if same is None:
                distinct.append(kw)
            row.append(same if same is not None else kw)
        out.append(row)
    return out


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def run_batch(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, device) -> torch.Tensor:
    return _first(layer(hidden.to(device), **_move(kwargs, device)))


@torch.no_grad()
def advance(index: int, layer: nn.Module, acts: Activations, device) -> None:
    """Replace each batch by the output of decoder layer `index` for it (same storage device and dtype)."""
    for b, kwargs in enumerate(acts.kwargs_for(index)):
        h = acts.hidden[b]
        acts.hidden[b] = run_batch(layer, h, kwargs, device).to(h.device, h.dtype)
