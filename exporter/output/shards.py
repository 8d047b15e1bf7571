"""Safetensors shards written while the layer loop runs: a decoder layer's tensors (in the export dtype) go
to disk the moment it is compressed, so no stage ever holds the compressed model. One file per decoder
layer plus one for everything outside the layers; at the end they become the usual Hugging Face layout:
one model.safetensors when the whole is small, else model-0000k-of-0000N.safetensors with its index.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..load.files import safetensors_header

INDEX = "model.safetensors.index.json"
METADATA = {"format": "pt"}
SINGLE_FILE_LIMIT = 2 * 2**30  # below this the shards are merged into one model.safetensors
_LAYER = re.compile(r"^\.shard-layer-(\d+)\.safetensors$")
_REST = ".shard-rest.safetensors"


def _unique_tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied tensors (lm_head = embeddings) once, under their first name, as save_pretrained does."""
    seen, out = set(), {}
    for name, t in named.items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


class ShardWriter:
    def __init__(self, folder: str | Path, dtype: torch.dtype):
        self.folder, self.dtype = Path(folder), dtype

    def _save(self, tensors: dict[str, torch.Tensor], file: str) -> None:
        data = {k: v.detach().to(device="cpu", dtype=self.dtype if v.is_floating_point() else v.dtype).contiguous()
                for k, v in tensors.items()}
        tmp = self.folder / (file + ".tmp")
        save_file(data, str(tmp), metadata=METADATA)
        os.replace(tmp, self.folder / file)  # a shard is on disk whole or not at all

    def write_layer(self, index: int, layer: nn.Module, prefix: str) -> None:
        self._save({prefix + k: v for k, v in _unique_tensors(layer.state_dict(keep_vars=True)).items()},
                   f".shard-layer-{index:05d}.safetensors")

    def read_layer(self, index: int) -> dict[str, torch.Tensor]:
        """What write_layer wrote for decoder layer `index` (a resumed run's layers before its checkpoint)."""
        return load_file(str(self.folder / f".shard-layer-{index:05d}.safetensors"))

    def write_rest(self, model: nn.Module, layers_prefix: str) -> None:
        """Everything outside the decoder layers: embeddings, final norm, lm_head (once when tied)."""
        state = _unique_tensors(model.state_dict(keep_vars=True))
        self._save({k: v for k, v in state.items() if not k.startswith(layers_prefix + ".")}, _REST)

    def resume(self, start: int) -> None:
        """Drop what a killed run wrote past its last checkpoint (layers >= start)."""
        for path in self.folder.iterdir():
            match = _LAYER.match(path.name)
            if (match and int(match.group(1)) >= start) or path.name.endswith(".safetensors.tmp"):
                path.unlink()

    def finish(self, single_file_limit: int | None = None) -> list[Path]:
        """Rename the shards into the Hugging Face layout; -> the model files."""
        limit = SINGLE_FILE_LIMIT if single_file_limit is None else single_file_limit
        parts = sorted((p for p in self.folder.iterdir() if _LAYER.match(p.name)),
                       key=lambda p: int(_LAYER.match(p.name).group(1)))
        parts = [self.folder / _REST] + parts
        missing = [p.name for p in parts if not p.exists()]
        if missing:
            raise RuntimeError(f"shard {missing[0]} was never written")
        total = sum(p.stat().st_size for p in parts)
        if total <= limit:
            merged = {}
            for p in parts:
                merged.update(load_file(str(p)))
            self._save(merged, "model.safetensors")
            for p in parts:
                p.unlink()
            return [self.folder / "model.safetensors"]
        weight_map, files, size = {}, [], 0
        for k, p in enumerate(parts, 1):
            final = self.folder / f"model-{k:05d}-of-{len(parts):05d}.safetensors"
            header = {k: v for k, v in safetensors_header(p).items() if k != "__metadata__"}
            weight_map.update({name: final.name for name in header})
            size += sum(end - start for start, end in (v["data_offsets"] for v in header.values()))
            os.replace(p, final)
            files.append(final)
        (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map},
                                                    indent=2))
        return files
