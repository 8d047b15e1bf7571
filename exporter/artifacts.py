"""Safetensors artifacts: save a compressed model with its rank plan, reload it in one call (verified
against the checksums recorded at save). The atomic output folder lives in output_dir.py."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint_keys import to_model_keys
from .checks import check_finite
from .checksums import record_checksums, verify_checksums
from .experts import unfuse_experts
from .lowrank import build_skeleton
from .output_dir import atomic_output  # noqa: F401 — moved to output_dir.py; re-exported for pipeline.py

CONFIG_KEY = "svd_export"  # the entry in config.json that holds method, ratio and every module's rank


def save_safetensors(model, tokenizer, folder: Path, meta: dict, max_shard_size: str = "4GB") -> None:
    """Factors + config.json (with the rank plan under CONFIG_KEY) + tokenizer + generation config."""
    model.config.__dict__[CONFIG_KEY] = meta
    try:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    finally:
        model.config.__dict__.pop(CONFIG_KEY, None)
    record_checksums(folder)
    tokenizer.save_pretrained(folder)


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for f in files:
        state.update(load_file(str(folder / f)))
    return state


def load_compressed(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Rebuild the low-rank skeleton from config.json's rank plan and load the factors into it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    meta = getattr(config, CONFIG_KEY, None)
    if not meta or "ranks" not in meta:
        raise ValueError(f"{folder} has no '{CONFIG_KEY}' entry with ranks in config.json: not an svd-export artifact")
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary buffers stay real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None))
    unfuse_experts(model)  # compress_ saved MoE experts one module per expert
    build_skeleton(model, meta["ranks"])
    verify_checksums(folder, meta)
    state = to_model_keys(model, _state_dict(folder))  # save_pretrained writes the hub's key names
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    check_finite(model.named_parameters(), str(folder))
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if unexpected or still_meta:
        raise ValueError(f"{folder}: checkpoint does not match its rank plan "
                         f"(unexpected {unexpected[:3]}, not loaded {still_meta[:3]})")
    if dtype is not None:
        model.to(dtype)
    return model.eval().to(device)
