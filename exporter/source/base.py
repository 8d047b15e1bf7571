"""The interface of a layer source."""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..architectures import Architecture, decoder_layers


class LayerSource:
    """model: the causal LM; everything outside the decoder layers is real and on `device`.
    materialize(i) -> decoder layer i with real weights on `device` (compute dtype); release(i) frees it
    (the layer keeps its structure, e.g. the LowRankLinear modules swapped in)."""
    model: nn.Module
    arch: Architecture
    device: torch.device
    compute_dtype: torch.dtype
    streamed: bool = False  # True: at most one decoder layer is ever materialised

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model, self.arch))

    def layer_prefix(self, i: int) -> str:
        return f"{self.arch.layers}.{i}."

    def materialize(self, i: int) -> nn.Module:
        raise NotImplementedError

    def release(self, i: int) -> None:
        raise NotImplementedError

    def layers(self, start: int = 0, desc: str | None = None) -> Iterator[tuple[int, nn.Module]]:
        """Layer by layer from `start`: yields (i, materialised layer) and releases it when the caller moves on.
        `desc`: one progress bar (layer i/N and ETA)."""
        indices = range(start, self.num_layers)
        bar = tqdm(indices, desc=desc, unit="layer", initial=start, total=self.num_layers) if desc else indices
        for i in bar:
            layer = self.materialize(i)
            try:
                yield i, layer
            finally:
                self.release(i)
