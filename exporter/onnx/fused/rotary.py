"""Rotary caches cos/sin [max positions, head_size/2] for ORT's RotaryEmbedding, computed as
transformers computes them: the inverse frequencies of the config's rope type (default, linear, llama3,
yarn… through transformers' own init functions), positions·inv_freq in float32, times the rope type's
attention scaling, then cast to the graph's type."""
from __future__ import annotations

import numpy as np
import torch

# The cache is a table over positions: rope types whose frequencies depend on the sequence length are
# refused by family_of (dynamic, longrope).
LENGTH_DEPENDENT = ("dynamic", "longrope")


def inverse_frequencies(config) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type in LENGTH_DEPENDENT:
        raise ValueError(f"rope type {rope_type!r} depends on the sequence length; a fixed cache cannot express it")
    if rope_type == "default":
        head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float) / head_size)), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config)


def rotary_caches(config, dtype) -> tuple[np.ndarray, np.ndarray]:
    inv_freq, scaling = inverse_frequencies(config)
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    return ((freqs.cos() * scaling).to(torch.float32).numpy().astype(dtype),
            (freqs.sin() * scaling).to(torch.float32).numpy().astype(dtype))
