"""One weight → MatMulNBits inputs, with ONNX Runtime's own block quantizer (the one its MatMulNBitsQuantizer
runs on every MatMul of a loaded model), called per weight as the writer streams it: the whole model is never
in memory. Also the bytes that layout stores, counted without ONNX Runtime (tests check the count against the
quantizer's arrays)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...config import Quantization


def nbits_bytes(k: int, n: int, q: Quantization, scale_bytes: int) -> int:
    """Bytes of one K×N matmul weight as MatMulNBits: packed blocks + scales (+ packed zero points)."""
    blocks = math.ceil(k / q.block_size)
    packed = n * blocks * math.ceil(q.block_size * q.bits / 8)
    scales = n * blocks * scale_bytes
    zero_points = 0 if q.symmetric else n * math.ceil(blocks * q.bits / 8)
    return packed + scales + zero_points


def linear_bytes(out_features: int, in_features: int, rank: int | None, q: Quantization | None,
                 element_size: int) -> int:
    """Weight bytes of one linear (no bias): dense (rank None) or its low-rank pair, float or quantized.
    A pair is x·downᵀ (K=in, N=rank) then ·upᵀ (K=rank, N=out)."""
    if q is None:
        params = out_features * in_features if rank is None else rank * (out_features + in_features)
        return params * element_size
    if rank is None:
        return nbits_bytes(in_features, out_features, q, element_size)
    return nbits_bytes(in_features, rank, q, element_size) + nbits_bytes(rank, out_features, q, element_size)


@dataclass
class NBitsWeight:
    packed: np.ndarray  # uint8 [N, blocks, block_size·bits/8]
    scales: np.ndarray  # float [N, blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(blocks·bits/8)]; None when symmetric
    k: int
    n: int


def quantize_weight(weight_kn: np.ndarray, q: Quantization, scale_dtype, scales=None) -> NBitsWeight:
    """weight_kn: the MatMul's B (K×N, float). `scales` (torch [N, blocks], float32): the grid the layer loop put
    the weight on (exporter/quantize): its codes are stored as they were chosen. None: ONNX Runtime's own
    round-to-nearest, from float32. Scales in `scale_dtype` (the graph's)."""
    k, n = weight_kn.shape
    if scales is not None:
        import torch

        from ...quantize.grid import encode
        codes = encode(torch.from_numpy(np.ascontiguousarray(weight_kn.T)), scales, q).numpy()
        return NBitsWeight(pack(codes, q), scales.numpy().astype(scale_dtype), None, k, n)
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer
    config = DefaultWeightOnlyQuantConfig(block_size=q.block_size, is_symmetric=q.symmetric,
                                          accuracy_level=q.accuracy_level or None, bits=q.bits)
    packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(weight_kn, dtype=np.float32))
    return NBitsWeight(packed, scales.astype(scale_dtype), None if q.symmetric else zero_points, k, n)


def pack(codes: np.ndarray, q: Quantization) -> np.ndarray:
    """Codes [N, blocks·block_size] (uint8 < 2^bits) → MatMulNBits' B [N, blocks, block_size·bits/8]: 8/bits
    codes a byte, the first in the low bits."""
    per_byte = 8 // q.bits
    grouped = codes.reshape(codes.shape[0], -1, q.block_size // per_byte, per_byte).astype(np.uint8)
    packed = np.zeros(grouped.shape[:-1], np.uint8)
    for i in range(per_byte):
        packed |= grouped[..., i] << (q.bits * i)
    return packed


def dequantize(w: NBitsWeight, q: Quantization) -> np.ndarray:
    """The K×N float32 weight MatMulNBits computes with: for checks against a PyTorch model that carries
    the same rounded weights."""
    per_byte = 8 // q.bits
    codes = np.stack([(w.packed >> (q.bits * i)) & ((1 << q.bits) - 1) for i in range(per_byte)], axis=-1)
    codes = codes.reshape(w.n, -1, q.block_size).astype(np.float32)  # [N, blocks, block]
    blocks = codes.shape[1]
    if w.zero_points is None:
        zero = np.float32(1 << (q.bits - 1))
    else:
        zp = np.stack([(w.zero_points >> (q.bits * i)) & ((1 << q.bits) - 1) for i in range(per_byte)], axis=-1)
        zero = zp.reshape(w.n, -1)[:, :blocks, None].astype(np.float32)
    values = (codes - zero) * w.scales.astype(np.float32).reshape(w.n, blocks, 1)
    return values.reshape(w.n, -1)[:, :w.k].T
