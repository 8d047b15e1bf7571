"""--quantize int4|int8: the setting, and the bytes it stores, without ONNX Runtime.

Weights are quantized by ONNX Runtime's own block quantizer into MatMulNBits (exporter/onnx_build/
quantize.py): a K×N matmul weight is cut, per output column, into blocks of `block_size` along K, each
block stored as `bits`-bit integers with one scale (in the graph's float type) and, unless symmetric, one
`bits`-bit zero point. The byte arithmetic below is that layout's, so a budget can count the quantized
model before it exists (tests check it against the quantizer's arrays)."""
from __future__ import annotations

import math
from dataclasses import dataclass

CHOICES = {"int4": 4, "int8": 8}
# The defaults were measured on SmolLM2-135M, ORT CPU: docs/results/throughput-cpu.md, "Quantization
# settings" (block size, symmetric or not, accuracy level, lm_head bits: speed and perplexity).
DEFAULT_BLOCK_SIZE = 32
HEAD_BITS = 8  # lm_head's bits whatever --quantize says: 4 bits there is what hurts SmolLM2 most


@dataclass(frozen=True)
class Quantization:
    bits: int = 4
    block_size: int = DEFAULT_BLOCK_SIZE
    symmetric: bool = True  # no zero points
    accuracy_level: int = 4  # MatMulNBits' compute type: 4 = int8 activations (CPU), 0 = the activations' type
    head_bits: int = HEAD_BITS  # the lm_head's bits

    def __post_init__(self):
        if self.bits not in CHOICES.values() or self.head_bits not in CHOICES.values():
            raise ValueError(f"quantization bits must be 4 or 8, got {self.bits} (lm_head {self.head_bits})")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy level must be 0-4, got {self.accuracy_level}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def head(self) -> "Quantization":
        """The lm_head's setting: head_bits, the rest as for the decoder's linears."""
        return Quantization(self.head_bits, self.block_size, self.symmetric, self.accuracy_level, self.head_bits)

    @classmethod
    def parse(cls, name: str | None, block_size: int = DEFAULT_BLOCK_SIZE) -> "Quantization | None":
        """'int4' | 'int8' | None/'none' -> the setting (None: float weights)."""
        if name in (None, "none"):
            return None
        if name not in CHOICES:
            raise ValueError(f"--quantize must be one of {', '.join(CHOICES)}, got {name!r}")
        return cls(bits=CHOICES[name], block_size=block_size)


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


def plan_bytes(matrices, plan: dict[str, int], q: Quantization | None, element_size: int) -> int:
    """Weight bytes of the candidate linears (exporter.allocation.Matrix) under a rank plan: what --budget
    counts for them when the export is quantized (dense where absent from the plan)."""
    return sum(linear_bytes(m.out_features, m.in_features, plan.get(m.name), q, element_size) for m in matrices)


def head_bytes(vocab: int, hidden: int, q: Quantization | None, element_size: int) -> int:
    """lm_head's bytes in the export (HEAD_BITS when quantized). A tied embedding table is stored once more
    as the float Gather table: count it apart, as the dense part it is."""
    return linear_bytes(vocab, hidden, None, None if q is None else q.head(), element_size)
