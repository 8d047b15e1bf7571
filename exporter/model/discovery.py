"""Architecture discovery: where a causal LM's decoder layers are, which linears each layer has, and which
of them read the same input — seen, not listed.

  layers  the ModuleList of the classes transformers names in `_no_split_modules` (its decoder layers);
  linears every nn.Linear / Conv1D inside a layer, per-expert linears included, routers excluded
          (structure only: works on the meta device);
  groups  one forward of ONE materialised layer with a pre-hook on every linear: linears handed the same
          tensor share one X Xᵀ. Each expert's linears form their own groups (their input is the tokens
          routed to that expert), known from the ExpertList's structure.

Layers of one model may differ (DeepSeek's first dense layers, Qwen2-MoE's `mlp_only_layers`): layers
are compared by their structure, and one forward per distinct structure finds its groups.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
import torch.nn as nn

from .architecture import ARCHITECTURES, Architecture, InputGroup
from .corrected import CorrectedLinear
from .experts import ExpertList, is_fused_experts, is_router, unfuse_experts
from .layer_inputs import capture_layer_inputs
from .linears import is_linear, linear_dims
from .lowrank import LowRankLinear

log = logging.getLogger(__name__)

SAMPLE_TOKENS = 8


class DiscoveryError(ValueError):
    pass


def check_causal_lm(model: nn.Module) -> None:
    """One clear line for what cannot work at all, before any work."""
    config = getattr(model, "config", None)
    name = getattr(config, "model_type", type(model).__name__)
    if config is None:
        raise DiscoveryError(f"{type(model).__name__} is not a transformers model (no config)")
    if getattr(config, "is_encoder_decoder", False):
        raise DiscoveryError(f"architecture {name!r} is an encoder-decoder; only decoder-only causal LMs are supported")
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise DiscoveryError(f"architecture {name!r} ({type(model).__name__}) has no causal LM head; "
                             "load it with AutoModelForCausalLM")


def _module_lists(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)
            and not isinstance(m, ExpertList) and len(m) > 0]


def find_decoder_layers(model: nn.Module) -> str:
    """The path of the decoder layers' ModuleList: the list of the classes transformers keeps whole on one
    device (`_no_split_modules`); without those, the one list as long as the config's layer count."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    lists = [(name, m) for name, m in _module_lists(model) if all(type(layer).__name__ in classes for layer in m)]
    if not lists:
        lists = [(name, m) for name, m in _module_lists(model) if len(m) == count]
    if len(lists) > 1:  # e.g. a vision tower next to the text decoder: the one the config counts
        lists = [(name, m) for name, m in lists if len(m) == count] or lists
    if len(lists) != 1:
        found = ", ".join(name for name, _ in lists) or "none"
        raise DiscoveryError(f"cannot tell the decoder layers of {model.config.model_type!r} "
                             f"(layer lists of {sorted(classes)}: {found}); add an entry to ARCHITECTURES")
    return lists[0][0]


def layer_linears(layer: nn.Module) -> list[str]:
    """Paths (inside the layer) of the linears to compress, in module order: routers and shared-expert
    gates stay dense."""
    paths = []
    for parent_name, parent in layer.named_modules():
        if isinstance(parent, (LowRankLinear, CorrectedLinear)):  # already compressed: its parts are not candidates
            continue
        children = list(parent.children())
        for child_name, child in parent.named_children():
            if is_linear(child) and not is_router(child, children):
                paths.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return paths


def signature(layer: nn.Module) -> tuple:
    """What makes two layers' groups the same: their class and their linears' paths and shapes."""
    return (type(layer).__name__,) + tuple((p, linear_dims(layer.get_submodule(p))) for p in layer_linears(layer))


def _identity(x: torch.Tensor) -> tuple:
    # The tensors are held until grouping, so no storage is reused by another tensor in between.
    return x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype


def _expert_groups(path: str, experts: ExpertList) -> list[InputGroup]:
    groups = []
    for i, expert in enumerate(experts):
        first = "gate_up_proj" if expert.gated else "up_proj"
        groups.append(InputGroup((f"{path}.{i}.{first}",), routed=True))
        groups.append(InputGroup((f"{path}.{i}.down_proj",), routed=True))
    return groups


@torch.no_grad()
def discover_layer_groups(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> tuple[InputGroup, ...]:
    """Run `layer` once on (hidden, kwargs) with a pre-hook on every linear; group the linears by the
    tensor they were handed, in the order of their first call."""
    linears = layer_linears(layer)
    experts = {name: m for name, m in layer.named_modules() if isinstance(m, ExpertList)}
    observed = [p for p in linears if not any(p.startswith(e + ".") for e in experts)]
    events: list[tuple[str, object]] = []  # (path, input tensor) or (experts path, None), in call order

    def on_linear(path):
        def hook(_module, args):
            events.append((path, args[0]))
        return hook

    def on_experts(path):
        def hook(_module, _args):
            events.append((path, None))
        return hook

    handles = [layer.get_submodule(p).register_forward_pre_hook(on_linear(p)) for p in observed]
    handles += [m.register_forward_pre_hook(on_experts(p)) for p, m in experts.items()]
    try:
        layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()

    calls: dict[str, int] = {}
    groups: list[list[str]] = []
    keys: dict[tuple, int] = {}
    ordered: list[object] = []  # group index or an ExpertList group list, in first-call order
    for path, x in events:
        if x is None:
            if path not in calls:
                ordered.append(_expert_groups(path, experts[path]))
            calls[path] = calls.get(path, 0) + 1
            continue
        calls[path] = calls.get(path, 0) + 1
        if calls[path] > 1:
            continue
        key = _identity(x)
        if key not in keys:
            keys[key] = len(groups)
            groups.append([])
            ordered.append(keys[key])
        groups[keys[key]].append(path)
    repeated = sorted(p for p, n in calls.items() if n > 1 and p in observed)
    if repeated:
        raise DiscoveryError(f"{repeated[0]} runs {calls[repeated[0]]} times in one forward of {type(layer).__name__}: "
                             "its inputs cannot be told apart; add an entry to ARCHITECTURES")
    unused = [p for p in observed if p not in calls]
    if unused:
        log.warning("%s: %d linear(s) never run in a forward and stay dense: %s", type(layer).__name__, len(unused),
                    unused)
    out: list[InputGroup] = []
    for item in ordered:
        out.extend(item if isinstance(item, list) else [InputGroup(tuple(groups[item]))])
    return tuple(out)


def linears_only(model: nn.Module) -> Architecture:
    """The decoder layers and their linears from the structure alone (a meta skeleton will do), each linear
    in a group of its own: enough to count parameters (the --budget preflight), NOT to gather statistics,
    which need the input groups that only discover() sees."""
    path = find_decoder_layers(model)
    per_layer = tuple(tuple(InputGroup((p,)) for p in layer_linears(layer)) for layer in model.get_submodule(path))
    same = all(groups == per_layer[0] for groups in per_layer)
    return Architecture(layers=path, groups=per_layer[0], per_layer=None if same else per_layer)


def _sample_ids(model: nn.Module) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    return (torch.arange(SAMPLE_TOKENS) * 7 % vocab).unsqueeze(0)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def discover(model: nn.Module, materialize: Callable[[int], ContextManager] | None = None) -> Architecture:
    """The Architecture of a causal LM. One forward of one layer per distinct layer structure: a layer of
    that structure that is materialised (not on the meta device), else layer i materialised by
    `materialize(i)` for the duration (a streamed loader's context manager). The embeddings and rotary
    embeddings must be materialised; the other layers may stay on the meta device."""
    check_causal_lm(model)
    fused = [name for name, m in model.named_modules() if is_fused_experts(m)]
    if fused:
        raise DiscoveryError(f"{fused[0]} holds fused experts: call exporter.model.experts.unfuse_experts(model) first")
    path = find_decoder_layers(model)
    layers = model.get_submodule(path)
    signatures = [signature(layer) for layer in layers]
    device = _device_of(model.get_input_embeddings())
    sample = capture_layer_inputs(model, layers, [_sample_ids(model)], device, storage=device)
    found: dict[tuple, tuple[InputGroup, ...]] = {}
    for sig in dict.fromkeys(signatures):
        with_sig = [i for i, other in enumerate(signatures) if other == sig]
        real = [i for i in with_sig if _device_of(layers[i]).type != "meta"]
        if not real and materialize is None:
            raise DiscoveryError(f"{path}.{with_sig[0]} is on the meta device: discovery runs one forward of one "
                                 "layer of each structure; materialise one (discover(model, materialize=...))")
        i = real[0] if real else with_sig[0]
        with (nullcontext() if real else materialize(i)):
            layer = layers[i]
            hidden = sample.hidden[0].to(_device_of(layer))
            found[sig] = discover_layer_groups(layer, hidden, sample.kwargs_for(i)[0])
    per_layer = tuple(found[sig] for sig in signatures)
    same = all(groups == per_layer[0] for groups in per_layer)
    return Architecture(layers=path, groups=per_layer[0], per_layer=None if same else per_layer)


def architecture_of(model: nn.Module, materialize=None) -> Architecture:
    """The override for this model type if there is one, else what discovery finds (`materialize(i)`: a
    context manager that makes decoder layer i real for a moment, for a streamed model). Fused MoE experts
    must have been unfused first (exporter.model.experts.unfuse_experts)."""
    check_causal_lm(model)
    model_type = getattr(model.config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    return discover(model, materialize)


def prepare(model: nn.Module) -> Architecture:
    """Everything compress_ and the ONNX export need before they start: fused MoE experts become per-expert
    linears, in place (an equivalent model, checked), and the architecture is found — or one clear line
    for a model they cannot handle, before any work."""
    unfuse_experts(model)
    return architecture_of(model)
