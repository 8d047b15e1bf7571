"""The inputs of the decoder layers, captured without running them.

Layer 0 gets the embeddings; every layer gets keyword arguments the model computed before its layer loop
(attention mask, rotary position embeddings, position ids). They are NOT the same for every layer:
Gemma 2/3 alternate sliding-window and full-attention layers, each with its own mask, and Gemma 3 gives
them rotary embeddings of different bases. Reusing layer 0's arguments everywhere would compute the
statistics of a different model without any error.

So every decoder layer's forward is replaced, for one model call per batch, by a stub that records what
it was given and hands its hidden states on unchanged; the last stub stops the model (no final norm, no
LM head). No layer computes anything, so the layers may sit on the meta device.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.nn as nn

from .activations import Activations, shared_across_batches
from .architecture import Architecture, decoder_layers

DROPPED = ("use_cache", "output_attentions")  # flags about caching/outputs, not inputs of the computation


class _Captured(Exception):
    pass


def _is_cache(value) -> bool:
    from transformers.cache_utils import Cache
    return isinstance(value, Cache)


def _as_kwargs(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """(hidden states, every other argument by name): positional arguments (GPT-2 passes some) are bound
    to the layer's own parameter names, so they can be replayed as keywords. The cache is left out: the
    layer loop runs without one."""
    signature = inspect.signature(type(layer).forward)
    bound = signature.bind(layer, *args, **kwargs)
    named = dict(bound.arguments)
    named.pop(next(iter(signature.parameters)))  # self
    for p in signature.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            named.update(named.pop(p.name, {}))
        elif p.kind is p.VAR_POSITIONAL and named.get(p.name):
            raise ValueError(f"{type(layer).__name__} was called with extra positional arguments; cannot replay them")
    hidden = named.pop(next(iter(named)))  # the first parameter is the layer's input
    return hidden, {k: v for k, v in named.items() if k not in DROPPED and not _is_cache(v)}


@contextmanager
def _stubbed(layers: nn.ModuleList, record):
    """Each layer's forward → record(i, args, kwargs), return the hidden states unchanged; the last raises."""
    def stub(i, layer):
        def forward(*args, **kwargs):
            hidden = record(i, layer, args, kwargs)
            if i == len(layers) - 1:
                raise _Captured
            return hidden
        return forward

    for i, layer in enumerate(layers):
        layer.forward = stub(i, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute; the class's forward is visible again


def _share(previous: dict | None, current: dict) -> dict:
    """The previous layer's dict when every value is the same object (no copy of masks per layer)."""
    if previous is not None and previous.keys() == current.keys() and all(previous[k] is current[k] for k in current):
        return previous
    return current


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], device,
                         storage="cpu") -> Activations:
    """Layer 0's hidden states and every layer's keyword arguments for each batch (`layers`: the model's
    decoder layers, found by discovery or named by an Architecture)."""
    hidden: list[torch.Tensor] = []
    layer_kwargs: list[list[dict]] = [[] for _ in layers]

    def record(i, layer, args, kwargs):
        h, named = _as_kwargs(layer, args, kwargs)
        if i == 0:
            hidden.append(h.to(storage))
        previous = layer_kwargs[i - 1][-1] if i > 0 else None
        layer_kwargs[i].append(_share(previous, named))
        return h

    with _stubbed(layers, record):
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
            else:
                raise RuntimeError("the model finished a forward without calling its last decoder layer: "
                                   "its layer list is not the one it runs")
    return Activations(hidden, shared_across_batches(layer_kwargs))


@torch.no_grad()
def capture_inputs(model: nn.Module, arch: Architecture, batches: list[torch.Tensor], device,
                   storage="cpu") -> Activations:
    """What decoder layer 0 receives for each batch, and the keyword arguments of every layer. Only the
    modules outside the decoder layers need real weights: the layers may still be on `meta`."""
    return capture_layer_inputs(model, decoder_layers(model, arch), batches, device, storage)
