"""The activations the layer loop carries from one decoder layer to the next (model/activations.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.activations import Activations


@dataclass
class Streams:
    """The activations the compression pass carries from layer to layer."""
    calib: Activations  # calibration inputs through the original layers
    calib_compressed: Activations | None = None  # ... through the compressed layers (two-stream methods)
    eval_dense: Activations | None = None  # evaluation windows through the original layers
    eval_compressed: Activations | None = None  # ... through the compressed layers
    e2e_dense: Activations | None = None  # end-to-end refinement's own batches through the original layers
    # --quantize: the lm_head's float weight (on the host) for the dense model's perplexity, since the model's own
    # head goes on the grid after the loop (loop/head_quantization.py); None otherwise
    dense_head: torch.Tensor | None = None

    def named(self) -> dict[str, Activations]:
        """The activation streams (what the resume state keeps), by name."""
        return {k: v for k, v in vars(self).items() if isinstance(v, Activations)}
