"""The default recipe: what `svd-export --model X --ratio R` runs when no --method is given. It is to be the
best recipe measured on validation text (benchmarks/quality_smollm2.py --split validation,
docs/results/quality-smollm2-validation.md); until rows at every ratio are measured there, it stays SVD-LLM V2
with its paper's allocation and no refinement, as before. Every paper recipe stays one flag away:
`--method svd-llm-v2` is SVD-LLM V2 with its own allocation, `--method adasvd` AdaSVD with adaCR.
"""
from __future__ import annotations

from .config import CompressionConfig


def default_compression(ratio: float) -> dict:
    """CompressionConfig fields of the default recipe at `ratio` (the ratio itself excluded)."""
    return {"method": "svd-llm-v2"}


def recipe_name(config: CompressionConfig) -> str:
    """How the summary and report.json name what ran, e.g. "default: svd-llm-v2 + v2"."""
    parts = [config.method, config.allocation_name] + (["refine " + config.refine] if config.refine != "none" else [])
    return (f"{config.recipe}: " if config.recipe else "") + " + ".join(parts)
