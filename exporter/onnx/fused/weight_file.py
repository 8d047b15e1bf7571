"""The external data file, written as the graph is built: each tensor's bytes go to disk when it is
added, and the graph keeps only an ir.ExternalTensor (file, offset, length), never the array. This is
what bounds the builder's memory by one tensor (one decoder layer at a time for the caller)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..files import DATA_FILE

# Large tensors start at 64 KiB offsets (ORT memory-maps external data; aligned weights map without
# a copy); small ones at 64 bytes, which is enough for any SIMD load.
LARGE, LARGE_ALIGN, SMALL_ALIGN = 1 << 20, 1 << 16, 64


class WeightFile:
    def __init__(self, folder: str | Path, name: str = DATA_FILE):
        self.folder, self.name = Path(folder), name
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file = open(self.folder / name, "wb")
        self.bytes_written = 0  # payload only, without alignment padding

    def add(self, name: str, array: np.ndarray) -> ir.ExternalTensor:
        """Write `array` now; -> the reference the graph holds instead of it."""
        if self._file.closed:
            raise RuntimeError(f"{self.folder / self.name} is already closed: the model was finished")
        array = np.ascontiguousarray(array)
        align = LARGE_ALIGN if array.nbytes >= LARGE else SMALL_ALIGN
        offset = -self._file.tell() % align + self._file.tell()
        self._file.seek(offset)
        self._file.write(array.data if array.nbytes else b"")
        self.bytes_written += array.nbytes
        return ir.ExternalTensor(self.name, offset, array.nbytes, ir.DataType.from_numpy(array.dtype),
                                 shape=ir.Shape(array.shape), name=name, base_dir=self.folder)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
