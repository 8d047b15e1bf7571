"""Open a model: the whole of it in memory (load), or as a layer source that streams one decoder layer at a
time from its checkpoint (open_source); the name was resolved by names.py."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch

from .gguf_once import parsed_once
from .names import ModelLoadError, ModelSource, resolve

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load(spec: str, dtype: str | None = "float32", device: str | None = None):
    """The whole model in memory. -> (model in eval mode on `device`, tokenizer, ModelSource).
    dtype None: the checkpoint's (float32 for GGUF, whose tensors are de-quantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .integrity import check_checkpoint_files, check_finite, check_loading_info

    source = resolve(spec)
    check_checkpoint_files(source.location, source.gguf_file)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        with parsed_once() if source.gguf_file else nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
            model, info = AutoModelForCausalLM.from_pretrained(
                source.location, dtype=parse_dtype(dtype) if dtype else ("float32" if source.gguf_file else "auto"),
                output_loading_info=True, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load model {spec!r} ({source.describe()}): {first}") from exc
    check_loading_info(info, source.describe())
    check_finite(model.named_parameters(), source.describe())
    if source.gguf_file:
        # transformers de-quantizes GGUF tensors to `dtype` on load but keeps a GGUF "quantizer" that makes
        # save_pretrained refuse: the weights are plain floats, so drop the marker.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    model.eval().to(pick_device(device))
    return model, tokenizer, source


WEIGHT_PATTERNS = (["*.safetensors", "*.safetensors.index.json"], ["*.bin", "*.bin.index.json"])
SIDECAR_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "*.model", "chat_template.jinja"]


def local_folder(source: ModelSource) -> Path:
    """A checkpoint folder on disk: the directory given, or the hub snapshot (safetensors preferred, else .bin)."""
    path = Path(source.location)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    for weights in WEIGHT_PATTERNS:
        try:
            folder = Path(snapshot_download(source.location, allow_patterns=weights + SIDECAR_PATTERNS))
        except Exception as exc:  # noqa: BLE001 — offline, unknown id, gated repo: one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"could not download {source.location!r} from the Hugging Face hub: {first}") from exc
        if any(folder.glob(weights[0])):
            return folder
    raise ModelLoadError(f"{source.location!r} has neither safetensors nor .bin weights on the hub")


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil
    return psutil.virtual_memory().available


def open_source(spec: str, dtype: str | None = None, device: str | None = None, whole_model=None):
    """The model as a layer source. A checkpoint folder (or hub id) is streamed one decoder layer at a time
    unless `whole_model` says why a stage needs it all in memory (FWSVD, the gradient allocations, generated
    text; a callable gets the checkpoint's config and says it or None); that is refused with one line when it
    does not fit. A GGUF file is always loaded whole (transformers de-quantizes it on load).
    -> (LayerSource, tokenizer, ModelSource, export dtype)."""
    from transformers import AutoTokenizer

    from .checkpoint import CheckpointSource, not_streamable, skeleton_of
    from .files import TensorFiles
    from .integrity import check_checkpoint_files
    from .resident import ResidentSource

    source, target = resolve(spec), pick_device(device)
    if source.gguf_file:
        model, tokenizer, source = load(spec, dtype, device)
        return ResidentSource(model, target), tokenizer, source, next(model.parameters()).dtype
    folder = local_folder(source)
    check_checkpoint_files(folder)  # a truncated or corrupt file: one line naming it, before any work
    skeleton = skeleton_of(folder)
    if callable(whole_model):
        whole_model = whole_model(skeleton.config)
    whole_model = whole_model or not_streamable(skeleton)
    del skeleton
    if whole_model:
        files = TensorFiles(folder)
        held = torch.float32 if target.type == "cpu" else (parse_dtype(dtype) if dtype else files.float_dtype())
        element = torch.empty((), dtype=held).element_size()
        need = files.num_elements() * element
        if need > available_bytes(target):
            raise ModelLoadError(f"{whole_model}, and the whole model ({need / 1e9:.1f} GB) does not fit in the "
                                 f"{available_bytes(target) / 1e9:.1f} GB available on {target}")
        model, tokenizer, _ = load(str(folder), dtype, device)
        export_dtype = next(model.parameters()).dtype
        if target.type == "cpu":  # computed in float32 (CPUs), holding values rounded to the export dtype
            model.float()
        return ResidentSource(model, target), tokenizer, source, export_dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the tokenizer of {spec!r} ({folder}): {str(exc).strip().splitlines()[0]}") from exc
    layers = CheckpointSource(folder, target, export_dtype=parse_dtype(dtype) if dtype else None)
    return layers, tokenizer, source, layers.export_dtype
