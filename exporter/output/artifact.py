"""The safetensors artifact: the weights (written by output/shards.py, layer by layer), config.json with the
rank plan under CONFIG_KEY, the tokenizer and generation config, and per-shard checksums recorded in config.json
at save and verified by load_compressed, so a truncated or bit-flipped file never loads. The output folder
itself (lock, temporary folder, rename) lives in output/folder.py."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ..load.integrity import CorruptInput, check_finite, check_safetensors_file, safetensors_files
from ..load.key_renaming import to_model_keys
from ..model.corrected import build_corrections
from ..model.discovery import find_decoder_layers
from ..model.experts import unfuse_experts
from ..model.lowrank import build_skeleton
from ..model.quantized import attach_scales
from .shards import ShardWriter

CONFIG_KEY = "svd_export"  # the entry in config.json that holds method, ratio and every module's rank


def write_sidecars(model_config, generation_config, tokenizer, folder: Path, meta: dict | None = None,
                   dtype: torch.dtype | None = None) -> None:
    """config.json (with the rank plan under CONFIG_KEY and the export dtype, when given), the generation
    config and the tokenizer: what transformers reads beside the weights (the ONNX folder too)."""
    config = type(model_config).from_dict(model_config.to_dict())
    if dtype is not None:
        config.dtype = dtype
    if meta is not None:
        config.__dict__[CONFIG_KEY] = meta
    config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def finish_artifact(writer: ShardWriter, model: nn.Module, layers_path: str, tokenizer, folder: Path, meta: dict,
                    dtype: torch.dtype) -> list[Path]:
    """After the decoder layers went through `writer`: everything outside them, the shards renamed into the
    Hugging Face layout, the sidecars, the checksums. -> the weight files."""
    writer.write_rest(model, layers_path)
    files = writer.finish()
    write_sidecars(model.config, getattr(model, "generation_config", None), tokenizer, folder, meta, dtype)
    record_checksums(folder)
    return files


def save_compressed(model: nn.Module, tokenizer, folder: str | Path, meta: dict) -> list[Path]:
    """A compressed model that is in memory, written as the layer loop writes one (the same shards, config
    entry and checksums), in its own dtype; load_compressed reads it back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    writer = ShardWriter(folder, dtype)
    layers_path = find_decoder_layers(model)
    for i, layer in enumerate(model.get_submodule(layers_path)):
        writer.write_layer(i, layer, f"{layers_path}.{i}.")
    return finish_artifact(writer, model, layers_path, tokenizer, folder, meta, dtype)


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
    build_corrections(model, meta.get("corrections", {}))  # --correction-rank's float pairs
    if meta.get("weights") == NO_WEIGHTS:
        raise ValueError(f"{folder} has no safetensors weights ({NO_WEIGHTS}): load its model.onnx with ONNX Runtime")
    verify_checksums(folder, meta)
    state = to_model_keys(model, _state_dict(folder))  # save_pretrained writes the hub's key names
    state = attach_scales(model, state)  # --quantize: the grid's scales beside the weights they belong to
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


CHUNK = 16 * 2**20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_checksums(folder: str | Path) -> dict[str, dict]:
    """Write {shard: {bytes, sha256}} for every safetensors shard into config.json's svd_export entry."""
    folder = Path(folder)
    sums = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in safetensors_files(folder)}
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault(CONFIG_KEY, {})["checksums"] = sums
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sums


NO_WEIGHTS = "none: written with --format onnx alone (model.onnx holds the weights)"


def drop_weight_files(folder: str | Path, files: list[Path]) -> None:
    """--format onnx alone: the safetensors the streamed export read back are removed, and config.json stops
    recording them, so that a reader is told the folder has none instead of that they went missing."""
    folder = Path(folder)
    for f in files + [folder / "model.safetensors.index.json"]:
        f.unlink(missing_ok=True)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault(CONFIG_KEY, {}).update(checksums={}, weights=NO_WEIGHTS)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def verify_checksums(folder: str | Path, meta: dict) -> None:
    """Every shard the folder needs exists, is complete and matches its recorded checksum (folders written
    before checksums existed get the header/size check only)."""
    folder = Path(folder)
    recorded = meta.get("checksums") or {}
    for path in safetensors_files(folder):
        if path.name not in recorded:
            check_safetensors_file(path)
            continue
        if not path.is_file():
            raise CorruptInput(f"{path}: file not found")
        want = recorded[path.name]
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CorruptInput(f"{path}: {size} bytes, {want['bytes']} were written: the file is truncated or "
                               "was replaced")
        if sha256(path) != want["sha256"]:
            raise CorruptInput(f"{path}: sha256 differs from the one recorded at save: the file is corrupt")
    missing = sorted(set(recorded) - {p.name for p in safetensors_files(folder)})
    if missing:
        raise CorruptInput(f"{folder / missing[0]}: file not found (recorded at save)")
