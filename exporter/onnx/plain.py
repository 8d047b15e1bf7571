"""Decoder-with-past ONNX export (Hugging Face Optimum's names) and the compressed graph built from it.

The dense model is exported once, with torch.onnx's dynamo exporter, through a wrapper that takes the KV
cache as flat tensors; every linear's MatMul/Gemm is tagged with its module name. A compressed model is
then that graph rewritten by graph_rewrite (each tagged weight → two low-rank MatMuls), never a second
export: the factors are read from the LowRankLinear modules.

Folder: model.onnx + model.onnx_data (external data) + config.json + generation_config.json + tokenizer
files + genai_config.json (onnxruntime-genai).
"""
from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
import torch.nn as nn

from graph_rewrite.module_names import tag_linears
from graph_rewrite.passes import rewrite_lowrank
from graph_rewrite.rules.lowrank import LowRankFactors

from ..model.discovery import prepare
from ..model.linears import is_linear, linear_weight
from ..model.lowrank import LowRankLinear
from .files import DATA_FILE, MODEL_FILE, copy_sidecars, write_onnx_sidecars

log = logging.getLogger(__name__)

MIN_OPSET = 18
INLINE_BYTES = 1024
DTYPES = {"float32": torch.float32, "float16": torch.float16}

@dataclass(frozen=True)
class OnnxArch:
    genai_type: str  # onnxruntime-genai's model.type
    genai_known: bool  # False: genai has no type of its own serving this graph; the config uses its generic one
    position_ids: bool = True  # a graph input (OPT's default derives them from the mask; it accepts them too)


# config.model_type -> onnxruntime-genai's (0.18) own model.type, where that type serves our graph
# (decoder with past, Optimum's names); each is checked by a greedy generation in tests/test_families.py.
# genai's "gpt2" type is left out on purpose: it expects other graph inputs. Every other model type gets
# genai's generic decoder-only type, which runs any such graph (also checked there, family by family).
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
               "gemma2": "gemma2", "gemma3_text": "gemma3_text"}
GENAI_GENERIC = "decoder"


def onnx_arch(model: nn.Module) -> OnnxArch:
    """How `model` is exported: every architecture the compressor handles (discovery) is; anything else is
    refused with discovery's one line, before any work. MoE experts are unfused in place (exporter/model/experts.py),
    so that each expert's linears are MatMuls of their own in the graph."""
    prepare(model)
    model_type = getattr(model.config, "model_type", None)
    return OnnxArch(GENAI_TYPES.get(model_type, GENAI_GENERIC), model_type in GENAI_TYPES)


def check_opset(opset: int) -> int:
    if opset < MIN_OPSET:
        raise ValueError(f"--opset {opset} is not supported: the KV-cache decoder needs opset >= {MIN_OPSET}")
    return opset


def kv_layout(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of the cache tensors [batch, kv_heads, length, head_size]."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_size


def io_names(num_layers: int, position_ids: bool) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask"] + (["position_ids"] if position_ids else [])
    inputs += [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return inputs, outputs


class FlatCacheDecoder(nn.Module):
    """forward(input_ids, attention_mask, [position_ids,] *past) -> (logits, *present), the cache as flat
    [batch, kv_heads, length, head_size] tensors: torch.export cannot trace a model that returns a Cache."""

    def __init__(self, model: nn.Module, position_ids: bool):
        super().__init__()
        self.model = model  # a reference, not a copy: the weights are in memory once
        self.position_ids = position_ids

    def forward(self, input_ids, attention_mask, *rest):
        from transformers import DynamicCache
        position_ids, past = (rest[0], rest[1:]) if self.position_ids else (None, rest)
        # Full-length layers even where the model slides a window (Gemma 2/3): the sliding-window mask
        # limits what a layer attends to, and every present.{i} stays past + new, as the inputs promise.
        cache = DynamicCache()
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def example_inputs(config, position_ids: bool, dtype: torch.dtype, device) -> tuple:
    # Every dynamic dimension gets an example size >= 2 and distinct from the others, or torch.export
    # may specialise it to a constant.
    batch, new, past_len = 2, 3, 4
    layers, kv_heads, head_size = kv_layout(config)
    ids = torch.zeros(batch, new, dtype=torch.long, device=device)
    mask = torch.ones(batch, past_len + new, dtype=torch.long, device=device)
    pos = torch.arange(past_len, past_len + new, device=device).expand(batch, new)
    past = [torch.zeros(batch, kv_heads, past_len, head_size, dtype=dtype, device=device) for _ in range(2 * layers)]
    return (ids, mask, *([pos] if position_ids else []), *past)


def dynamic_shapes(num_layers: int, position_ids: bool) -> dict:
    from torch.export import Dim
    batch, seq = Dim("batch_size"), Dim("sequence_length")
    past, total = Dim("past_sequence_length"), Dim("total_sequence_length")
    rest = ([{0: batch, 1: seq}] if position_ids else []) + [{0: batch, 2: past}] * (2 * num_layers)
    # Keyed like FlatCacheDecoder.forward's parameters; `rest` is its *varargs.
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total}, "rest": tuple(rest)}


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def check_dtype(dtype: str | torch.dtype | None, model: nn.Module) -> torch.dtype:
    if dtype is None:
        dtype = model_dtype(model)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"ONNX export supports --dtype {' or '.join(DTYPES)}, not {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"ONNX export supports --dtype {' or '.join(DTYPES)}, not {dtype}")
    return dtype


def export_onnx(model: nn.Module, tokenizer, folder: str | Path, dtype: str | torch.dtype | None = None,
                opset: int = MIN_OPSET) -> Path:
    """Export `model` (dense or compressed) as a decoder with past into `folder`; returns the model.onnx path.

    dtype: "float32" | "float16" (default: the model's). A run loads the model in the export dtype,
    so the weights are in memory once; a different dtype exports from a converted copy (a cast there
    and back would round the caller's weights)."""
    arch = onnx_arch(model)
    check_opset(opset)
    dtype = check_dtype(dtype, model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = model.eval() if model_dtype(model) == dtype else copy.deepcopy(model).to(dtype).eval()
    program = trace(source, arch, dtype, opset)
    found = tag_linears(program.model, LinearWeights(source), prefix="model.")
    log.info("tagged %d linear weights with their module names", len(found))
    path = save_graph(program.model, folder)
    del program, source
    write_sidecars(model, tokenizer, folder, arch)
    return path


def trace(model: nn.Module, arch: OnnxArch, dtype: torch.dtype, opset: int):
    layers = model.config.num_hidden_layers
    inputs, outputs = io_names(layers, arch.position_ids)
    device = next(model.parameters()).device
    wrapper = FlatCacheDecoder(model, arch.position_ids).eval()
    # The exporter's own chatter (optional torchvision ops, dynamic-axis renames, pytree deprecations)
    # says nothing about this model; real errors still raise.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch\.onnx\..*|copyreg")
        return torch.onnx.export(
            wrapper, example_inputs(model.config, arch.position_ids, dtype, device), dynamo=True,
            dynamic_shapes=dynamic_shapes(layers, arch.position_ids), input_names=inputs, output_names=outputs,
            opset_version=opset, verbose=False)


class LinearWeights:
    """name -> weight (out×in, numpy) of every linear (nn.Linear, Conv1D), read on demand (a view, never a
    copy on CPU): what graph_rewrite.module_names matches graph weights against."""

    def __init__(self, model: nn.Module):
        self._modules = {n: m for n, m in model.named_modules() if is_linear(m)}

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def __iter__(self):
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, name: str) -> np.ndarray:
        return linear_weight(self._modules[name]).detach().cpu().numpy()


def save_graph(graph: ir.Model, folder: Path) -> Path:
    path = folder / MODEL_FILE
    # Always external data: one layout for every size, and required past protobuf's 2 GB limit. Tensors up
    # to 1 KB stay inline: onnx_ir's checker pass keeps such tensors in the proto it checks, and an external
    # one there is looked up relative to the working directory (a tiny model's 128-float bias failed).
    ir.save(graph, path, external_data=DATA_FILE, size_threshold_bytes=INLINE_BYTES)
    return path


def write_sidecars(model: nn.Module, tokenizer, folder: Path, arch: OnnxArch) -> None:
    if not arch.genai_known:
        log.info("onnxruntime-genai has no model type of its own that serves this graph for %r: "
                 "genai_config.json uses its generic %r type", model.config.model_type, arch.genai_type)
    write_onnx_sidecars(model.config, getattr(model, "generation_config", None), tokenizer, folder, arch.genai_type,
                        arch.position_ids, share_buffer=False)


def lowrank_factors(model: nn.Module) -> dict:
    """module name -> LowRankFactors(down r×in, up out×r, bias) of every LowRankLinear in the model."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            # float32 on the way to numpy (which has no bfloat16); the rule casts to the graph's dtype
            out[name] = LowRankFactors(
                down=module.down.weight.detach().float().cpu().numpy(), up=module.up.weight.detach().float().cpu().numpy(),
                bias=None if module.up.bias is None else module.up.bias.detach().float().cpu().numpy())
    return out


def export_compressed(dense_onnx: str | Path, model: nn.Module, folder: str | Path) -> tuple[Path, int]:
    """Rewrite the dense graph with the model's low-rank factors into `folder` (+ the dense folder's
    config/tokenizer files). -> (model.onnx path, number of rewritten linears)."""
    dense_onnx, folder = Path(dense_onnx), Path(folder)
    graph = ir.load(dense_onnx)
    factors = lowrank_factors(model)
    count = rewrite_lowrank(graph, factors)
    folder.mkdir(parents=True, exist_ok=True)
    path = save_graph(graph, folder)
    copy_sidecars(dense_onnx.parent, folder)
    return path, count
