"""What MatMulNBits at accuracy level 4 does to its input, as PyTorch does it: ONNX Runtime's CPU kernel
rounds the activations to int8 per block of `block_size` along K (scale = the block's max |x| / 127, round to
nearest) and multiplies integers: tests/test_quantize.py checks one MatMulNBits node (K = 576, 4 and 8 bits)
against it to 1e-4, where the same weights without the rounding are over 1e-2 off. A PyTorch reference with these hooks computes what
the graph computes, so its parity check can be tight."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.corrected import grid_linears

INT8_MAX = 127
_HOOKED = "_svd_export_int8_inputs"  # marks a module that already carries the hook


def int8_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x rounded to int8 per block of `block_size` along its last dimension (the last block zero-padded), in
    x's dtype. An all-zero block stays zero (its scale is 0: guarded)."""
    k = x.shape[-1]
    pad = -k % block_size
    blocks = F.pad(x.float(), (0, pad)).unflatten(-1, (-1, block_size))
    scale = blocks.abs().amax(dim=-1, keepdim=True) / INT8_MAX
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    rounded = torch.round(blocks / safe) * scale
    return rounded.flatten(-2)[..., :k].to(x.dtype)


def add_int8_inputs(module: nn.Module, block_size: int) -> None:
    """Hook `module` (an nn.Linear the graph runs as MatMulNBits) so its input is rounded as the kernel rounds
    it; once per module (a streamed layer is hooked each time it is read)."""
    if getattr(module, _HOOKED, None) is None:
        setattr(module, _HOOKED, module.register_forward_pre_hook(
            lambda _m, args: (int8_blocks(args[0], block_size), *args[1:])))


def remove_int8_inputs(root: nn.Module) -> None:
    for module in root.modules():
        handle = getattr(module, _HOOKED, None)
        if handle is not None:
            handle.remove()
            delattr(module, _HOOKED)


def int8_linears(root: nn.Module, block_size: int) -> None:
    """Every nn.Linear under `root` that the graph runs as MatMulNBits (a float correction pair is not)."""
    for module in grid_linears(root):
        add_int8_inputs(module, block_size)


@contextmanager
def int8_inputs(root: nn.Module, block_size: int):
    """int8_linears for the duration of the block, and none after it."""
    int8_linears(root, block_size)
    try:
        yield
    finally:
        remove_int8_inputs(root)
