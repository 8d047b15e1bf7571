"""Refuse incomplete or corrupt inputs before they become a silently wrong model: each check names the file
or tensor at fault. Used when loading a model (load/open.py) and when reloading a compressed one (output/artifact.py).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable

import torch

MAX_HEADER = 100 * 2**20  # safetensors refuses headers above 100 MB too


class CorruptInput(ValueError):
    pass


def check_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """NaN/Inf weights, found at load (not as 'the model overflowed' minutes later), naming the tensor."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CorruptInput(f"{where}: tensor {name} has {bad} non-finite value(s) (NaN/Inf)")


def safetensors_data_size(path: Path) -> int:
    """The file size the safetensors header describes; CorruptInput naming the file when it cannot be read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptInput(f"{path}: truncated safetensors file ({size} bytes, no header)")
        length = int.from_bytes(head, "little")
        if length > min(MAX_HEADER, size - 8):
            raise CorruptInput(f"{path}: truncated or not a safetensors file (header of {length} bytes, "
                               f"file of {size})")
        try:
            header = json.loads(f.read(length))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise CorruptInput(f"{path}: corrupt safetensors header ({type(exc).__name__})") from exc
    return 8 + length + max(ends, default=0)


def check_safetensors_file(path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise CorruptInput(f"{path}: file not found")
    expected, size = safetensors_data_size(path), path.stat().st_size
    if size != expected:
        state = "truncated" if size < expected else "has trailing bytes"
        raise CorruptInput(f"{path}: {state}: {size} bytes, its header describes {expected}")


def safetensors_files(folder: Path) -> list[Path]:
    """The shards of a checkpoint folder: those its index names (each must exist), else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptInput(f"{index}: corrupt index ({type(exc).__name__})") from exc
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def check_safetensors_folder(folder: str | Path) -> None:
    for path in safetensors_files(Path(folder)):
        check_safetensors_file(path)


# GGUF: just enough of the format to know where the last tensor ends (gguf.GGUFReader parses every
# metadata field into numpy views: seconds for a tokenizer's 49k strings).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Reader:
    def __init__(self, f, path):
        self.f, self.path = f, path

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        raw = self.f.read(size)
        if len(raw) < size:
            raise CorruptInput(f"{self.path}: truncated GGUF file (ends inside its header)")
        return struct.unpack("<" + fmt, raw)[0]

    def string(self) -> bytes:
        n = self.take("Q")
        raw = self.f.read(n)
        if len(raw) < n:
            raise CorruptInput(f"{self.path}: truncated GGUF file (ends inside its header)")
        return raw

    def value(self, kind: int):
        if kind == _GGUF_STRING:
            return self.string()
        if kind == _GGUF_ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item in _GGUF_SCALARS:  # skip fixed-size arrays in one seek
                self.f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[item]), 1)
                return None
            for _ in range(count):
                self.value(item)
            return None
        if kind not in _GGUF_SCALARS:
            raise CorruptInput(f"{self.path}: corrupt GGUF header (unknown value type {kind})")
        return self.take(_GGUF_SCALARS[kind])


def check_gguf_file(path: str | Path) -> dict:
    """Magic, header and that every tensor's bytes lie inside the file. Returns the header's scalar and
    string fields (arrays skipped), e.g. general.architecture."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, path)
        if f.read(4) != b"GGUF":
            raise CorruptInput(f"{path}: not a GGUF file (bad magic)")
        r.take("I")  # version
        n_tensors, n_kv = r.take("Q"), r.take("Q")
        header = {}
        for _ in range(n_kv):
            key = r.string().decode(errors="replace")
            value = r.value(r.take("I"))
            if isinstance(value, bytes):
                header[key] = value.decode(errors="replace")
            elif value is not None and not isinstance(value, list):
                header[key] = value
        alignment = header.get("general.alignment", 32)
        end = 0
        for _ in range(n_tensors):
            name = r.string().decode(errors="replace")
            dims = [r.take("Q") for _ in range(r.take("I"))]
            kind, offset = r.take("I"), r.take("Q")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError) as exc:
                raise CorruptInput(f"{path}: tensor {name} has an unknown GGUF type {kind}") from exc
            elements = 1
            for d in dims:
                elements *= d
            end = max(end, offset + elements // block * type_size)
        data_start = -(-f.tell() // alignment) * alignment
    if data_start + end > size:
        raise CorruptInput(f"{path}: truncated GGUF file: {size} bytes, its tensors need {data_start + end}")
    return header


def check_loading_info(info: dict, where: str) -> None:
    """transformers' output_loading_info: a missing tensor would be randomly initialised, an unexpected one
    silently dropped. Both are errors naming the first tensor."""
    for key, what in (("missing_keys", "is missing tensor"), ("unexpected_keys", "has an unexpected tensor"),
                      ("mismatched_keys", "has a tensor of the wrong shape")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise CorruptInput(f"{where}: the checkpoint {what} {names[0]}{more}: an incomplete or foreign "
                               "checkpoint would give a silently wrong model")


def check_checkpoint_files(location: str | Path, gguf_file: str | None = None) -> None:
    """The files of a local checkpoint are complete (a hub id's are checked by its download)."""
    location = Path(location)
    if gguf_file:
        check_gguf_file(location / gguf_file)
    elif location.is_dir():
        check_safetensors_folder(location)
