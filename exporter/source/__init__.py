"""Where the weights come from, one decoder layer at a time (exporter/stream runs the loop over a source).

  ResidentSource    a model already in memory (GGUF files, tests, library callers of compress_)
  CheckpointSource  a skeleton on the `meta` device; layer i is read from the checkpoint's memory-mapped
                    safetensors (or .bin) files when its turn comes and freed after
  WrittenSource     the compressed model read back from the output folder, layer by layer (streamed ONNX)
"""
from .base import LayerSource  # noqa: F401
from .checkpoint import CheckpointSource  # noqa: F401
from .resident import ResidentSource  # noqa: F401
from .written import WrittenSource  # noqa: F401
