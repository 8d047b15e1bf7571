"""The default recipe: what `svd-export --model X --ratio R` runs when no --method is given, chosen on
validation text (docs/quality.md, docs/results/quality-smollm2-validation.md). Every paper recipe stays one
flag away: `--method svd-llm-v2` is SVD-LLM V2 with its own allocation, `--method adasvd` AdaSVD with adaCR.
"""
from __future__ import annotations

from .config import CompressionConfig


def default_compression(ratio: float) -> dict:
    """CompressionConfig fields of the default recipe at `ratio` (the ratio itself excluded)."""
    return {"method": "adasvd", "allocation": "adacr", "refine": "block"}


def recipe_name(config: CompressionConfig, default: bool) -> str:
    """How the summary and report.json name what ran."""
    parts = [config.method, config.allocation_name] + (["refine " + config.refine] if config.refine != "none" else [])
    return ("default recipe: " if default else "") + " + ".join(parts)
