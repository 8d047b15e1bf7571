"""The default recipe is the one measured best on validation text, and each paper's recipe stays one flag away."""
from __future__ import annotations

import json
from pathlib import Path

from exporter.cli import compression_config
from exporter.recipe import recipe_name

ROOT = Path(__file__).resolve().parents[1]


def test_no_method_runs_the_default_recipe():
    config = compression_config(None, 0.4)
    assert (config.method, config.allocation_name, config.recipe) == ("adasvd", "adacr", "default")
    assert recipe_name(config) == "default: adasvd + adacr"


def test_a_method_runs_its_papers_recipe_and_user_options_override():
    v2 = compression_config("svd-llm-v2", 0.4)
    assert (v2.method, v2.allocation_name, v2.recipe) == ("svd-llm-v2", "v2", "")
    chosen = compression_config(None, 0.4, allocation="uniform", rank_multiple=None)
    assert (chosen.method, chosen.allocation_name, chosen.rank_multiple) == ("adasvd", "uniform", 1)


def test_the_default_leads_on_the_stored_validation_rows():
    """exporter/recipe.py's choice against the rows it cites: at every ratio with both rows stored, the
    default's validation perplexity is the lower one."""
    rows = [r for r in json.loads((ROOT / "docs/results/quality-smollm2.json").read_text())
            if "validation" in r["setting"] and r.get("seed", 0) == 0]
    ppl = {(r["row"], r["ratio"]): r["ppl"] for r in rows}
    ratios = [q for (row, q) in ppl if row == "svd-llm-v2:v2" and ("adasvd:adacr", q) in ppl]
    assert sorted(ratios) == [0.2, 0.4, 0.6, 0.8]
    assert all(ppl["adasvd:adacr", q] < ppl["svd-llm-v2:v2", q] for q in ratios)
