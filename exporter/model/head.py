"""Logits from the last decoder layer's output, through the model's own code.

The decoder layers are swapped, for the duration of one call, for a stand-in that returns the given hidden
states; the model's forward then applies whatever the architecture puts after its layers (final norm,
OPT's project_out, lm_head, Gemma's logit soft-capping) exactly as it would. The embeddings and the mask
it computes on the way are thrown away (cheap next to a decoder layer).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .architecture import Architecture


class _Replay(nn.Module):
    """Returns the stored hidden states; any other attribute the model's forward reads from a layer (e.g.
    Gemma's `attention_type`) comes from the layer it stands in for."""

    def __init__(self, layer: nn.Module, store: dict):
        super().__init__()
        self._stand_in_for = (layer,)  # a tuple: not registered as a submodule
        self._store = store

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._stand_in_for[0], name)

    def forward(self, hidden_states, *args, **kwargs):
        return self._store["hidden"]


@contextmanager
def _replaying(model: nn.Module, arch: Architecture):
    parent_name, _, attr = arch.layers.rpartition(".")
    parent = model.get_submodule(parent_name)
    layers = getattr(parent, attr)
    store: dict = {}
    setattr(parent, attr, nn.ModuleList([_Replay(layer, store) for layer in layers]))
    try:
        yield store
    finally:
        setattr(parent, attr, layers)


def head_forward(model: nn.Module, arch: Architecture, hidden: torch.Tensor, ids: torch.Tensor, device) -> torch.Tensor:
    """Logits [batch, seq, vocab] (on `device`, the head's dtype) for final hidden states `hidden` of token ids
    `ids`, differentiable in `hidden`. Every position is independent after the last decoder layer, so a slice
    of positions (hidden[:, a:b], ids[:, a:b]) gives the logits of that slice."""
    with _replaying(model, arch) as store:
        store["hidden"] = hidden.to(device)
        return model(input_ids=ids.to(device), use_cache=False).logits


@torch.no_grad()
def head_logits(model: nn.Module, arch: Architecture, hidden: torch.Tensor, ids: torch.Tensor, device) -> torch.Tensor:
    """Logits [batch, seq, vocab] (float32, host) for final hidden states `hidden` of token ids `ids`."""
    return head_forward(model, arch, hidden, ids, device).float().cpu()


def stored_hidden_logits(model: nn.Module, arch: Architecture, final_hidden: list[torch.Tensor], device):
    """ids -> logits for windows whose final hidden states the layer loop stored, in order: `perplexity` asks
    for the windows in order, once each."""
    remaining = iter(final_hidden)
    return lambda ids: head_logits(model, arch, next(remaining), ids, device)
