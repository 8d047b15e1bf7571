"""svd-export: SVD-based low-rank compression of causal LLMs, exported as ONNX + safetensors."""
__version__ = "0.1.0"

from .artifacts import load_compressed  # noqa: E402,F401
from .compress import compress_  # noqa: E402,F401
from .config import CalibrationConfig, CompressionConfig, EvalConfig, RunConfig  # noqa: E402,F401
