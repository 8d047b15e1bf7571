"""The grid of a MatMulNBits weight, on out×in (nn.Linear) tensors.

A K×N MatMul weight B (K = in, N = out) is cut, per output row, into blocks of `block_size` along K; each block
has one scale s and integer codes c in [0, 2^bits); the value the kernel computes with is (c − z)·s, z =
2^(bits−1) for a symmetric grid. ONNX Runtime's own quantizer picks s as the block's value of largest
magnitude divided by −z, so that value lands exactly on the grid's end: scales_of does the same, so a
round-to-nearest here gives ORT's codes (tests/test_quantize.py checks it against its quantizer).
"""
from __future__ import annotations

import math

import torch

from ..config import Quantization


def zero_point(q: Quantization) -> int:
    return 1 << (q.bits - 1)


def blocks_of(in_features: int, q: Quantization) -> int:
    return math.ceil(in_features / q.block_size)


def scales_of(weight_block: torch.Tensor, q: Quantization, scale_dtype: torch.dtype) -> torch.Tensor:
    """One block's scale per row: its signed value of largest magnitude / −z, rounded to the dtype the graph
    stores scales in (the codes are then chosen against the stored scale). weight_block: rows × ≤ block_size."""
    index = weight_block.abs().argmax(dim=1, keepdim=True)
    extreme = weight_block.gather(1, index).squeeze(1)
    return (extreme / -zero_point(q)).to(scale_dtype).to(weight_block.dtype)


def searched_scales(weight_block: torch.Tensor, q: Quantization, scale_dtype: torch.dtype,
                    importance: torch.Tensor, shrinks: tuple[float, ...]) -> torch.Tensor:
    """Per row, the scale among scales_of(block)·shrink that rounds the block with the least importance-weighted
    squared error (importance: one weight per column, GPTQ passes diag(X Xᵀ)): clipping the largest value a
    little buys a finer grid for all the others."""
    base = scales_of(weight_block, q, scale_dtype)
    candidates = torch.stack([(base * f).to(scale_dtype).to(base.dtype) for f in shrinks])  # [S, rows]
    errors = torch.stack([(((weight_block - values_of(codes_of(weight_block, c, q), c, q)) ** 2) * importance).sum(1)
                          for c in candidates])
    return candidates.gather(0, errors.argmin(0, keepdim=True)).squeeze(0)


def codes_of(weight_block: torch.Tensor, scale: torch.Tensor, q: Quantization) -> torch.Tensor:
    """The codes of one block (rows × columns) against its per-row scale; an all-zero block (scale 0) gets the
    zero point, its values are 0 whatever the code."""
    z = zero_point(q)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # guard: scale 0 only for an all-zero block
    return (torch.round(weight_block / safe[:, None]) + z).clamp(0, 2 * z - 1)


def values_of(codes: torch.Tensor, scale: torch.Tensor, q: Quantization) -> torch.Tensor:
    return (codes - zero_point(q)) * scale[:, None]


def round_to_nearest(weight: torch.Tensor, q: Quantization, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, scales [out, blocks]) of the plain block quantizer: every block rounded on its own, all blocks at
    once, in the weight's dtype (also the forward of refinement's fake quantization, run at every step)."""
    out_features, in_features = weight.shape
    blocks = torch.nn.functional.pad(weight, (0, -in_features % q.block_size)).reshape(-1, q.block_size)
    scale = scales_of(blocks, q, scale_dtype)
    values = values_of(codes_of(blocks, scale, q), scale, q).view(out_features, -1)[:, :in_features]
    return values, scale.view(out_features, -1)


def round_on(weight: torch.Tensor, scales: torch.Tensor, q: Quantization) -> torch.Tensor:
    """`weight` rounded to nearest on a grid whose scales [out, blocks] are given (chosen before, by GPTQ's
    search): the values, in the weight's dtype. A weight already on that grid comes back unchanged."""
    out_features, in_features = weight.shape
    blocks = torch.nn.functional.pad(weight, (0, -in_features % q.block_size)).reshape(-1, q.block_size)
    scale = scales.reshape(-1).to(weight.dtype)
    return values_of(codes_of(blocks, scale, q), scale, q).view(out_features, -1)[:, :in_features]


def encode(weight: torch.Tensor, scales: torch.Tensor, q: Quantization) -> torch.Tensor:
    """The codes [out, blocks·block_size] (uint8, the padding 0) of a weight whose values are on
    the grid of `scales`: the exact inverse of values_of, for a writer that stores codes as they were chosen."""
    out_features, in_features = weight.shape
    blocks = blocks_of(in_features, q)
    padded = torch.zeros(out_features, blocks * q.block_size, dtype=torch.float64)
    padded[:, :in_features] = weight.to(torch.float64)
    codes = codes_of(padded.view(out_features * blocks, q.block_size), scales.reshape(-1).to(torch.float64), q)
    codes = codes.view(out_features, -1)
    codes[:, in_features:] = 0  # the padding, never read by the kernel: 0 as ONNX Runtime's quantizer writes it
    return codes.to(torch.uint8)

