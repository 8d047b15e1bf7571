"""Layer by layer: the one walk over a source's decoder layers that every pass of the loop (and the streamed
ONNX writer) takes. Each layer is materialised for its turn and released when the caller moves on."""
from __future__ import annotations

from collections.abc import Iterator

import torch.nn as nn
from tqdm.auto import tqdm

from ..load.source import LayerSource


def layer_by_layer(source: LayerSource, start: int = 0, desc: str | None = None) -> Iterator[tuple[int, nn.Module]]:
    """Yields (i, materialised decoder layer i) from `start` and releases it when the caller moves on.
    `desc`: one progress bar (layer i/N and ETA)."""
    indices = range(start, source.num_layers)
    bar = tqdm(indices, desc=desc, unit="layer", initial=start, total=source.num_layers) if desc else indices
    for i in bar:
        layer = source.materialize(i)
        try:
            yield i, layer
        finally:
            source.release(i)
