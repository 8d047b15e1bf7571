"""The compressed model read back from the folder the run just wrote, one decoder layer at a time: what the
streamed ONNX export and its validation walk after compression. The skeleton is the streamed source's own
(its layers already hold the LowRankLinear modules, on `meta`); the parts outside the layers are shared."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from accelerate.utils import set_module_tensor_to_device

from ..model.architecture import decoder_layers
from ..model.quantized import attach_scales, drop_scales, is_scale_key
from .files import CheckpointError, TensorFiles
from .source import LayerSource


class WrittenSource(LayerSource):
    streamed = True

    def __init__(self, source: LayerSource, folder: str | Path, transform=None):
        """transform(layer): applied in place to each layer once it is read (e.g. the rounding of a quantized
        export, for the PyTorch reference of its parity check)."""
        self.model, self.arch, self.device, self.compute_dtype = (source.model, source.arch, source.device,
                                                                  source.compute_dtype)
        self.files = TensorFiles(folder)
        self.transform = transform

    def materialize(self, i: int) -> nn.Module:
        layer, prefix = decoder_layers(self.model, self.arch)[i], self.layer_prefix(i)
        with self.files.opened():
            for name, _ in list(layer.named_parameters()):
                if prefix + name not in self.files.where:  # the writer wrote every parameter of the layer
                    raise CheckpointError(f"{self.files.folder}: the written model has no tensor {prefix + name}")
                value = self.files.get(prefix + name).to(self.compute_dtype)
                set_module_tensor_to_device(layer, name, self.device, value=value, clear_cache=False)
            attach_scales(layer, {key: self.files.get(key).to(self.device) for key in self.files.where
                                  if key.startswith(prefix) and is_scale_key(key)}, prefix)
        if self.transform is not None:
            self.transform(layer)
        return layer

    def release(self, i: int) -> None:
        layer = decoder_layers(self.model, self.arch)[i]
        for name, _ in list(layer.named_parameters()):
            set_module_tensor_to_device(layer, name, "meta", clear_cache=False)
        drop_scales(layer)
