"""A checkpoint folder's tensors by name, read one at a time: safetensors files memory-mapped through
`safe_open`, or PyTorch .bin files through `torch.load(mmap=True)` (older hub checkpoints such as OPT's).
Sharded or not: the HF index file says which file holds which tensor."""
from __future__ import annotations

import json
import math
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(RuntimeError):
    pass


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """tensor name -> file, from the index when there is one."""
    for index in INDEXES:
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return {name: folder / file for name, file in weight_map.items()}
    for single in SINGLE:
        if (folder / single).is_file():
            return {name: folder / single for name in _open(folder / single).keys()}
    raise CheckpointError(f"{folder} holds no model.safetensors, pytorch_model.bin or an index of shards")


def _open(path: Path):
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            return safe_open(str(path), framework="pt", device="cpu")
        return torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any reader failure is one line naming the file
        raise CheckpointError(f"cannot read checkpoint file {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


class TensorFiles:
    """Files are opened (memory-mapped) inside `opened()` only and unmapped when it ends: a mapped file's pages
    count in the process's resident memory once read, so keeping a 5 GB shard mapped for the whole run would
    look like (and, under pressure, cost) memory the loop never needs."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.where = checkpoint_files(self.folder)
        self._handles: dict[Path, object] | None = None
        missing = sorted({p for p in self.where.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"the checkpoint index names {missing[0]}, which does not exist")

    def keys(self) -> set[str]:
        return set(self.where)

    @contextmanager
    def opened(self):
        self._handles = {}
        try:
            yield self
        finally:
            self._handles = None  # unmapped with the last reference

    def get(self, name: str) -> torch.Tensor:
        """A tensor of its own (never a view of the mapped file)."""
        if self._handles is None:
            with self.opened():
                return self.get(name)
        path = self.where[name]
        if path not in self._handles:
            self._handles[path] = _open(path)
        handle = self._handles[path]
        try:
            tensor = handle.get_tensor(name) if path.suffix == ".safetensors" else handle[name]
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"cannot read tensor {name} from {path}: {exc}") from exc
        return tensor.clone()

    def num_elements(self) -> int:
        """Elements of every tensor (from the headers of safetensors files)."""
        total = 0
        for path in sorted(set(self.where.values())):
            if path.suffix == ".safetensors":
                for k, v in safetensors_header(path).items():
                    if k != "__metadata__":
                        total += math.prod(v["shape"])
            else:
                total += sum(t.numel() for t in _open(path).values())
        return total

    def float_dtype(self) -> torch.dtype:
        """The dtype most of the floating-point tensors are stored in (read from the headers only)."""
        counts: Counter = Counter()
        for path in sorted(set(self.where.values())):
            if path.suffix == ".safetensors":
                header = safetensors_header(path)
                counts.update(v["dtype"] for k, v in header.items() if k != "__metadata__")
            else:
                counts.update(str(t.dtype) for t in _open(path).values() if t.is_floating_point())
        names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "torch.float32": torch.float32,
                 "torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16}
        floats = [(n, c) for n, c in counts.most_common() if n in names]
        if not floats:
            raise CheckpointError(f"{self.folder}: no float32/float16/bfloat16 tensors in the checkpoint")
        return names[floats[0][0]]


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size <= 0 or size > path.stat().st_size - 8:
            raise CheckpointError(f"checkpoint file {path} is truncated or not a safetensors file")
        return json.loads(f.read(size))
