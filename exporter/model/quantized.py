"""Where a quantized linear keeps its grid: the scales ride beside the weight as a buffer of the nn.Linear,
so the state dict, the safetensors shards and every reader of a layer carry them with no second record.

The weight holds the values the graph computes with ((code − zero)·scale, in the model's dtype); the scales
[out, blocks] are float32 kept as their int32 bit pattern, because every `module.to(dtype)` casts floating
buffers and a scale rounded to bfloat16 would no longer give back the codes. A writer gets the codes as
they were chosen from round(weight / scale), exact whatever the weight's dtype (|error| ≤ 8·2⁻⁸·scale in
bfloat16, far from the half-step of a code)."""
from __future__ import annotations

import torch
import torch.nn as nn

SCALE_BITS = "weight_scale_bits"


def set_scales(linear: nn.Module, scales: torch.Tensor) -> None:
    linear.register_buffer(SCALE_BITS, scales.to(torch.float32).contiguous().view(torch.int32))


def scales_of(linear: nn.Module) -> torch.Tensor | None:
    """The float32 scales [out, blocks] of a quantized linear; None for a float one."""
    bits = getattr(linear, SCALE_BITS, None)
    return None if bits is None else bits.view(torch.float32)


def is_scale_key(key: str) -> bool:
    return key.endswith("." + SCALE_BITS)


def attach_scales(root: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Register the scale buffers a state dict holds (keys `prefix` + module + SCALE_BITS) on `root`'s modules
    and return the rest: a skeleton built from the rank plan has no such buffers until its weights come."""
    rest = {}
    for key, value in state.items():
        if key.startswith(prefix) and is_scale_key(key):
            module = root.get_submodule(key[len(prefix):-len(SCALE_BITS) - 1])
            module.register_buffer(SCALE_BITS, value)
        else:
            rest[key] = value
    return rest


def drop_scales(root: nn.Module) -> None:
    """Remove every scale buffer under `root`: a streamed layer gives its tensors back when released, the
    scales with its weights (a reader attaches them again from the shards)."""
    for module in root.modules():
        module._buffers.pop(SCALE_BITS, None)
