"""svd-export: SVD-based low-rank compression of causal LLMs, exported as ONNX + safetensors."""
__version__ = "0.1.0"

import importlib

# Loaded on first use, so that `svd-export --help` and the CLI's environment set-up (threads, -q) happen
# before torch and tqdm are imported.
_EXPORTS = {"load_compressed": ".output.artifact", "save_compressed": ".output.artifact", "compress_": ".loop.compress",
            "CalibrationConfig": ".config",
            "CompressionConfig": ".config", "EvalConfig": ".config", "RunConfig": ".config"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
