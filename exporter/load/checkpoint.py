"""A model streamed from its checkpoint: the skeleton is built on the `meta` device; the parts outside the
decoder layers (embeddings, final norm, lm_head, rotary buffers) are loaded once; decoder layer i is read
from the memory-mapped checkpoint when its turn comes and put back on `meta` after. Peak memory: one dense
layer (in the compute dtype) plus what the caller keeps.

Every parameter of the skeleton must come from the checkpoint (a tied lm_head excepted) and every tensor
of the checkpoint must land somewhere: a missing or unexpected tensor is an error naming it, never a
randomly initialised weight. Values are rounded to the export dtype before they are upcast to the compute
dtype, so that everything computed downstream (statistics, perplexity, losses) describes the model as it
is written.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device

from ..model.discovery import architecture_of, check_causal_lm, find_decoder_layers
from ..model.experts import is_fused_experts
from ..model.quantized import drop_scales
from .files import CheckpointError, TensorFiles
from .integrity import check_checkpoint_files
from .source import LayerSource


def default_compute_dtype(device: torch.device, export_dtype: torch.dtype) -> torch.dtype:
    # CPUs have fast float32 GEMMs and slow float16/bfloat16 ones; GPUs run the export dtype.
    return torch.float32 if device.type == "cpu" else export_dtype


def _tied_names(model: nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    names = set(tied) if isinstance(tied, (dict, list, tuple, set)) else set()
    return names if getattr(model.config, "tie_word_embeddings", False) else set()


def _renamed_keys(model: nn.Module, keys: set[str]) -> dict[str, str]:
    """{key after transformers' plain load-time renamings (e.g. an older `embed_out` → `lm_head`): key}."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    return {apply_renamings(k, renamings) if renamings else k: k for k in keys}


def not_streamable(model: nn.Module) -> str | None:
    """Why a model (a skeleton will do) cannot be read one layer at a time, or None."""
    fused = [name for name, m in model.named_modules() if is_fused_experts(m)]
    if fused:  # transformers fuses the checkpoint's per-expert tensors (hub names) while it loads
        return f"its MoE experts ({fused[0]}) are fused at load time by transformers, which is not streamed"
    return None


def skeleton_of(folder: Path, dtype: torch.dtype | None = None, config=None) -> nn.Module:
    """The model of a checkpoint folder with every parameter on `meta` (no weight read)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = config or AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary buffers stay real
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


class CheckpointSource(LayerSource):
    streamed = True

    def __init__(self, folder: str | Path, device="cpu", export_dtype: torch.dtype | None = None,
                 compute_dtype: torch.dtype | None = None, config=None):
        from transformers import AutoConfig

        self.folder = Path(folder)
        check_checkpoint_files(self.folder)  # a truncated or corrupt file is one line naming it, before any work
        self.files = TensorFiles(self.folder)
        self.checkpoint_dtype = self.files.float_dtype()
        self.export_dtype = export_dtype or self.checkpoint_dtype
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype or default_compute_dtype(self.device, self.export_dtype)
        self.config = config or AutoConfig.from_pretrained(self.folder)
        self.model = skeleton_of(self.folder, self.compute_dtype, self.config)
        check_causal_lm(self.model)
        reason = not_streamable(self.model)
        if reason:
            raise CheckpointError(reason)
        self.layers_path = find_decoder_layers(self.model)
        self.keys = self._match_keys()
        self._load_outside_layers()
        self.arch = architecture_of(self.model, materialize=self._visit)  # one forward of one real layer

    def _match_keys(self) -> dict[str, str]:
        """skeleton tensor name -> checkpoint key (with or without the base-model prefix, e.g. OPT's
        `decoder.layers.0…` for `model.decoder.layers.0…`)."""
        available = self.files.keys()
        renamed = _renamed_keys(self.model, available)
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        tied = _tied_names(self.model)
        keys, missing = {}, []
        for name in self.model.state_dict(keep_vars=True):
            candidates = [name]
            if prefix:
                candidates.append(name[len(prefix) + 1:] if name.startswith(prefix + ".") else f"{prefix}.{name}")
            key = next((c for c in candidates if c in available), None) or \
                next((renamed[c] for c in candidates if c in renamed), None)
            if key is not None:
                keys[name] = key
            elif name not in tied:
                missing.append(name)
        if missing:
            raise CheckpointError(f"{self.folder}: the checkpoint has no tensor for {missing[0]} "
                                  f"({len(missing)} missing): an incomplete checkpoint is never filled with random weights")
        ignore = [re.compile(p) for p in getattr(self.model, "_keys_to_ignore_on_load_unexpected", None) or []]
        unexpected = sorted(k for k in available - set(keys.values()) if not any(p.search(k) for p in ignore))
        if unexpected:
            raise CheckpointError(f"{self.folder}: the checkpoint tensor {unexpected[0]} has no place in a "
                                  f"{type(self.model).__name__} ({len(unexpected)} unexpected)")
        return keys

    def _set(self, root: nn.Module, name: str, full_name: str) -> None:
        value = self.files.get(self.keys[full_name])
        if value.is_floating_point():
            if not torch.isfinite(value).all():
                raise CheckpointError(f"{self.folder}: tensor {self.keys[full_name]} holds NaN or Inf values")
            value = value.to(self.export_dtype).to(self.compute_dtype)
        set_module_tensor_to_device(root, name, self.device, value=value, clear_cache=False)

    @contextmanager
    def _visit(self, i: int):
        self.materialize(i)
        try:
            yield
        finally:
            self.release(i)

    def _load_outside_layers(self) -> None:
        prefix = self.layers_path + "."
        with self.files.opened():
            for name in self.keys:
                if not name.startswith(prefix):
                    self._set(self.model, name, name)
        self.model.tie_weights()
        for name, buf in self.model.named_buffers():  # non-persistent buffers (rotary) come from the config
            if not name.startswith(prefix):
                set_module_tensor_to_device(self.model, name, self.device, value=buf, clear_cache=False)

    def _layer(self, i: int) -> nn.Module:
        return self.model.get_submodule(self.layers_path)[i]

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}."

    def materialize(self, i: int) -> nn.Module:
        layer = self._layer(i)
        prefix = self.layer_prefix(i)
        with self.files.opened():
            for name in self.keys:
                if name.startswith(prefix):
                    self._set(layer, name[len(prefix):], name)
        for name, buf in list(layer.named_buffers()):
            set_module_tensor_to_device(layer, name, self.device, value=buf, clear_cache=False)
        return layer

    def release(self, i: int) -> None:
        layer = self._layer(i)
        for name, _ in list(layer.named_parameters()):
            set_module_tensor_to_device(layer, name, "meta", clear_cache=False)
        drop_scales(layer)  # a quantized layer's scales: written with it, not kept beside the skeleton
