"""Safetensors artifacts: save a compressed model with its rank plan, reload it in one call; and the
atomic output folder (everything is written to a temporary sibling, renamed into place at the end)."""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint_keys import to_model_keys
from .experts import unfuse_experts
from .lowrank import build_skeleton

CONFIG_KEY = "svd_export"  # the entry in config.json that holds method, ratio and every module's rank


@contextlib.contextmanager
def atomic_output(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder next to `out`; on success it replaces `out`, on any error it is removed.
    A failed or interrupted run never leaves a partial artifact under the output name."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty (use --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_safetensors(model, tokenizer, folder: Path, meta: dict, max_shard_size: str = "4GB") -> None:
    """Factors + config.json (with the rank plan under CONFIG_KEY) + tokenizer + generation config."""
    model.config.__dict__[CONFIG_KEY] = meta
    try:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    finally:
        model.config.__dict__.pop(CONFIG_KEY, None)
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
    state = to_model_keys(model, _state_dict(folder))  # save_pretrained writes the hub's key names
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if unexpected or still_meta:
        raise ValueError(f"{folder}: checkpoint does not match its rank plan "
                         f"(unexpected {unexpected[:3]}, not loaded {still_meta[:3]})")
    if dtype is not None:
        model.to(dtype)
    return model.eval().to(device)
