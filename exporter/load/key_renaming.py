"""Checkpoint key names back to the model's own.

transformers renames some checkpoint keys when it loads a model (Mixtral's `block_sparse_moe.` → `mlp.`,
an older `embed_out` → `lm_head`, …) and save_pretrained writes the original names back. A state dict
loaded by hand (load_compressed) therefore has to go through the same renamings. Only the plain renamings:
a converter (which merges or splits tensors) never matches a compressed model's keys, whose experts are
already one module each.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def to_model_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every key the model does not know renamed by transformers' load-time renamings for it."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    expected = set(model.state_dict())
    unknown = [key for key in state if key not in expected]
    if not unknown:
        return state
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    out = dict(state)
    for key in unknown:
        renamed = apply_renamings(key, renamings)
        if renamed in expected and renamed not in out:
            out[renamed] = out.pop(key)
    return out
