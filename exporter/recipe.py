"""The default recipe: what `svd-export --model X --ratio R` runs when no --method is given, the best recipe
measured on validation text (`benchmarks/quality_smollm2.py --split validation`,
docs/results/quality-smollm2-validation.md: SmolLM2-135M, calibration from the first 75% of
wiki.valid.tokens, perplexity on the rest, one seed). AdaSVD with its adaCR allocation leads SVD-LLM V2 with
its own allocation at every ratio measured there: 30.42 vs 38.12 at 0.2, 43.68 vs 77.52 at 0.4, 72.45 vs
241.17 at 0.6, 141.19 vs 1733.96 at 0.8 (dense 17.13). Its adaComp strength β = 0.25 leads 0.1, 0.5 and the
paper's 1.0 on the same text at 0.4 (docs/adasvd.md).

Every paper recipe stays one flag away: `--method svd-llm-v2` is SVD-LLM V2 with its own allocation,
`--method adasvd` AdaSVD with adaCR (today the same settings as the default).
"""
from __future__ import annotations

from .config import CompressionConfig


def default_compression(ratio: float) -> dict:
    """CompressionConfig fields of the default recipe at `ratio` (the ratio itself excluded)."""
    return {"method": "adasvd"}


def recipe_name(config: CompressionConfig) -> str:
    """How the summary and report.json name what ran, e.g. "default: adasvd + adacr"."""
    parts = [config.method, config.allocation_name] + (["refine " + config.refine] if config.refine != "none" else [])
    return (f"{config.recipe}: " if config.recipe else "") + " + ".join(parts)
