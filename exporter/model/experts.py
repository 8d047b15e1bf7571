"""Mixture-of-experts layers as plain linears, one module per expert.

transformers (5.x) stores a layer's experts fused, as 3-D parameters of one module decorated with
`use_experts_implementation` (MixtralExperts, Qwen2MoeExperts, Qwen3MoeExperts, …):
    gate_up_proj [E, 2F, H] (or up_proj [E, F, H] without a gate), down_proj [E, H, F], optional biases,
    possibly stored transposed ([E, H, 2F] …).
Nothing there is an nn.Linear, so nothing can be swapped for a LowRankLinear, and no hook sees the tokens
of one expert. `unfuse_experts` replaces each such module by an ExpertList: a ModuleList whose i-th entry
is expert i as nn.Linear modules (`experts.{i}.gate_up_proj`, `experts.{i}.down_proj`), with the same
forward (hidden_states, top_k_index, top_k_weights) → hidden_states. Each expert's linears then only see
the tokens routed to it — exactly the statistics its compression needs — and the router, which is not
part of the experts module, stays as it is.

The replacement is checked against the original on a probe routing before the original is dropped
(when the weights are real, not on the meta device): a class whose forward differs is an error, never
a silently different model.
"""
from __future__ import annotations

import torch
import torch.nn as nn

PROBE_TOKENS_PER_EXPERT = 4
# Max |difference| / max |output| accepted between the original experts module and its replacement:
# the original may run another kernel (grouped_mm) that sums in a different order.
PROBE_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


class UnsupportedExperts(ValueError):
    pass


def _default_apply_gate():
    from transformers.integrations.moe import _default_apply_gate as gate
    return gate


def is_fused_experts(module: nn.Module) -> bool:
    """A module built by transformers' use_experts_implementation: 3-D expert parameters."""
    if isinstance(module, ExpertList) or not hasattr(module, "is_concatenated") or not hasattr(module, "has_gate"):
        return False
    first = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    return isinstance(first, torch.Tensor) and first.dim() == 3


class Expert(nn.Module):
    """One expert: gated (`gate_up_proj`: [gate; up], act(gate)·up) or not (`up_proj`: act(up)), then down_proj."""

    def __init__(self, first: nn.Linear, down_proj: nn.Linear, act_fn: nn.Module, gated: bool):
        super().__init__()
        self.gated = gated
        self.register_module("gate_up_proj" if gated else "up_proj", first)
        self.down_proj = down_proj
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act_fn(gate) * up)
        return self.down_proj(self.act_fn(self.up_proj(x)))


class ExpertList(nn.ModuleList):
    """The experts of one MoE layer, expert i at index i. Same call as transformers' fused experts modules.

    Every expert runs on the tokens routed to it (possibly none: an empty matmul), in expert order, and
    index_add_ accumulates like transformers' eager loop. No data-dependent Python branch, so torch.export
    traces it (the token counts become dynamic sizes)."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        routed_to = top_k_index.T  # [top_k, tokens]: torch.where walks it in the eager loop's order
        for index, expert in enumerate(self):
            slot, token = torch.where(routed_to == index)
            y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _expert_weight(param: torch.Tensor, index: int, transposed: bool) -> torch.Tensor:
    w = param[index]
    return w.T if transposed else w


def _linear_like(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding a copy of `weight` (out×in): a copy, so the fused tensor can be freed and no two
    saved tensors share memory (safetensors refuses shared storage)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    if weight.device.type != "meta":
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
    return linear


def check_supported(module: nn.Module, name: str) -> None:
    kind = type(module).__name__
    if not module.is_concatenated:
        raise UnsupportedExperts(f"{name} ({kind}): interleaved gate/up experts are not supported")
    if getattr(module, "has_post_expert_norm", False):
        raise UnsupportedExperts(f"{name} ({kind}): experts with a post-expert norm are not supported")
    if module.has_gate and type(module)._apply_gate is not _default_apply_gate():
        raise UnsupportedExperts(f"{name} ({kind}): experts with a custom gate function are not supported")


def to_expert_list(module: nn.Module, name: str = "experts") -> ExpertList:
    check_supported(module, name)
    gated, transposed = module.has_gate, module.is_transposed
    first = module.gate_up_proj if gated else module.up_proj
    first_bias = getattr(module, "gate_up_proj_bias" if gated else "up_proj_bias", None) if module.has_bias else None
    down_bias = getattr(module, "down_proj_bias", None) if module.has_bias else None
    experts = ExpertList()
    for i in range(first.shape[0]):
        experts.append(Expert(
            _linear_like(_expert_weight(first, i, transposed), None if first_bias is None else first_bias[i]),
            _linear_like(_expert_weight(module.down_proj, i, transposed), None if down_bias is None else down_bias[i]),
            module.act_fn, gated))
    return experts


def probe_routing(experts: int, hidden: int, dtype, device, seed: int = 0):
    """(hidden_states, top_k_index, top_k_weights) that send PROBE_TOKENS_PER_EXPERT tokens to every expert."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = experts * PROBE_TOKENS_PER_EXPERT
    top_k = min(2, experts)
    order = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    order[:, 0] = torch.arange(tokens) % experts  # every expert gets tokens
    order[:, 1:] = torch.where(order[:, 1:] == order[:, :1], (order[:, 1:] + 1) % experts, order[:, 1:])
    weights = torch.rand(tokens, top_k, generator=gen).softmax(-1)
    x = torch.randn(tokens, hidden, generator=gen)
    return x.to(device, dtype), order.to(device), weights.to(device, dtype)


@torch.no_grad()
def check_equivalent(original: nn.Module, replacement: ExpertList, name: str) -> float:
    """max |difference| / max |output| of the two modules on a probe routing; an error above tolerance."""
    weight = replacement[0].down_proj.weight
    probe = probe_routing(len(replacement), replacement[0].down_proj.out_features, weight.dtype, weight.device)
    expected, got = original(*probe), replacement(*probe)
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    error = float((expected.float() - got.float()).abs().max() / scale)
    tolerance = PROBE_RTOL.get(weight.dtype, 1e-5)
    if not error <= tolerance:
        raise UnsupportedExperts(f"{name} ({type(original).__name__}): its per-expert form differs from the fused "
                                 f"module by {error:.3g} (relative) on a probe routing; this experts class is not supported")
    return error


def unfuse_experts(root: nn.Module) -> list[str]:
    """Replace every fused experts module under `root` by an ExpertList, in place (one at a time, so only one
    layer's experts are ever held twice). Idempotent. -> the replaced module names."""
    names = [name for name, module in root.named_modules() if is_fused_experts(module)]
    for name in names:
        original = root.get_submodule(name)
        replacement = to_expert_list(original, name)
        if replacement[0].down_proj.weight.device.type != "meta":
            check_equivalent(original, replacement, name)
        root.set_submodule(name, replacement)
        del original
    return names


def is_router(linear: nn.Module, siblings: list[nn.Module]) -> bool:
    """A linear next to an experts module whose outputs number the experts (the router) or are a single
    value (a shared expert's sigmoid gate): both stay dense."""
    lists = [m for m in siblings if isinstance(m, ExpertList)]
    out_features = getattr(linear, "out_features", None)
    return bool(lists) and out_features is not None and any(out_features in (len(e), 1) for e in lists)
