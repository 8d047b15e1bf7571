"""The files of an exported ONNX folder, whichever graph wrote it: model.onnx with its weights in
model.onnx_data, the graph's metadata (which graph, which quantization), and the sidecars onnxruntime-genai
and transformers read beside it (config, generation config, tokenizer, genai_config.json)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..output.artifact import write_sidecars
from .genai_config import write_genai_config

MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx_data"
GRAPH_KEY, QUANTIZE_KEY = "svd_export.graph", "svd_export.quantize"  # model metadata (the plain graph has neither)
SIDECAR_FILES = ("config.json", "generation_config.json", "genai_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json",
                 "merges.txt", "tokenizer.model")


def copy_sidecars(src: Path, dst: Path) -> None:
    """Never overwrites: with --format safetensors too, its config.json (with the rank plan) stays."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in SIDECAR_FILES:
        if (src / name).exists() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def write_onnx_sidecars(config, generation_config, tokenizer, folder: Path, genai_type: str, position_ids: bool,
                        share_buffer: bool) -> None:
    """config/generation config/tokenizer and genai_config.json (with a tokenizer only), never over a file
    already in `folder`. share_buffer: the graph may write the present KV into the past buffer."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        write_sidecars(config, generation_config, tokenizer, Path(tmp))
        if tokenizer is not None:
            write_genai_config(config, generation_config, tokenizer, Path(tmp), genai_type, position_ids, MODEL_FILE,
                               share_buffer=share_buffer)
        copy_sidecars(Path(tmp), folder)


def find_onnx(folder: Path) -> Path:
    for candidate in (Path(folder) / MODEL_FILE, Path(folder) / "onnx" / MODEL_FILE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {MODEL_FILE} in {folder}: export with --format onnx first")


def graph_metadata(onnx_path: Path) -> dict:
    import onnx
    return {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}


def is_quantized(onnx_path: Path) -> bool:
    return graph_metadata(onnx_path).get(QUANTIZE_KEY, "none") != "none"
