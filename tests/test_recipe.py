"""The default recipe is the one measured best on validation text, and each paper's recipe stays one flag away."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from exporter.cli import compression_config, main
from exporter.recipe import recipe_name

ROOT = Path(__file__).resolve().parents[1]


def test_no_method_runs_the_default_recipe():
    config = compression_config(None, 0.4, calibration_batches=256)
    assert (config.method, config.allocation_name, config.refine, config.recipe) == ("adasvd", "global-fisher",
                                                                                      "block", "default")
    assert config.propagation == "compressed" and config.keep_dense_above == 0.9
    assert recipe_name(config) == "default: adasvd + global-fisher + keep dense above 0.9 + refine block"
    above = compression_config(None, 0.8, calibration_batches=256)  # adaCR above GLOBAL_FISHER_UP_TO
    assert recipe_name(above) == "default: adasvd + adacr + keep dense above 0.9 + refine block"
    from exporter.config import Quantization
    alone = compression_config(None, 0.0, calibration_batches=256, quantization=Quantization())
    assert alone.allocation_name == "adacr"  # --ratio 0 --quantize: nothing is allocated, no gradient pass


def test_the_default_without_batches_to_hold_out_drops_refinement_and_says_so():
    config = compression_config(None, 0.4, calibration_batches=1)
    assert (config.method, config.refine) == ("adasvd", "none")
    assert recipe_name(config) == ("default, no refine (1 calibration batch): adasvd + global-fisher + keep dense "
                                   "above 0.9")


def test_a_method_runs_its_papers_recipe_and_user_options_override():
    v2 = compression_config("svd-llm-v2", 0.4, calibration_batches=256)
    assert (v2.method, v2.allocation_name, v2.refine, v2.keep_dense_above, v2.recipe) == ("svd-llm-v2", "v2", "none",
                                                                                           1.0, "")
    chosen = compression_config(None, 0.4, 256, allocation="uniform", rank_multiple=None, refine="none")
    assert (chosen.method, chosen.allocation_name, chosen.rank_multiple, chosen.refine) == ("adasvd", "uniform", 1,
                                                                                            "none")


def test_the_cli_resolves_the_default_from_the_calibration_batches(tmp_path, monkeypatch):
    """The CLI counts batches as ⌈samples / batch size⌉: 3 samples in batches of 2 are two batches, refined."""
    seen = {}
    monkeypatch.setattr("exporter.run.run", lambda config, **_: seen.update(config=config.compression))
    monkeypatch.setattr("exporter.preflight.settle_default", lambda config, **_: config)
    for samples, refine in ((3, "block"), (2, "none")):
        result = CliRunner().invoke(main, ["--model", "m", "--calib-samples", str(samples), "--calib-batch-size", "2",
                                           "--out", str(tmp_path / f"out{samples}"), "-q"])
        assert result.exit_code == 0, result.output
        assert seen["config"].refine == refine


def test_each_part_of_the_default_leads_on_the_stored_validation_rows():
    """exporter/recipe.py's choices against the rows it cites (validation text, seed 0): the method and its
    allocation, then block refinement, at every ratio; the keep-dense threshold where it was measured."""
    rows = [r for r in json.loads((ROOT / "docs/results/quality-smollm2.json").read_text())
            if "validation" in r["setting"] and r["setting"].startswith("calib 16x256") and r.get("seed", 0) == 0]
    ppl = {(r["row"], r["ratio"]): r["ppl"] for r in rows}
    ratios = [0.2, 0.4, 0.6, 0.8]
    assert all(ppl["adasvd:adacr", q] < ppl["svd-llm-v2:v2", q] for q in ratios)
    assert all(ppl["adasvd:adacr:refine=block:refine_steps=64", q] < ppl["adasvd:adacr", q] for q in ratios)
    for q in (0.2, 0.4):
        kept = ppl["adasvd:adacr:keep_dense_above=0.9", q]
        assert kept < ppl["adasvd:adacr", q] and kept <= ppl["adasvd:adacr:keep_dense_above=0.95", q]
    for q in (0.6, 0.8):  # the whole default, where keep-dense was not measured alone
        default, refined = "adasvd:adacr:keep_dense_above=0.9:refine=block", "adasvd:adacr:refine=block:refine_steps=64"
        assert ppl[default, q] <= ppl[refined, q]
    # the allocation: global-fisher up to GLOBAL_FISHER_UP_TO, where it led on both calibration seeds
    from exporter.recipe import GLOBAL_FISHER_UP_TO
    adacr, fisher = "adasvd:adacr:keep_dense_above=0.9:refine=block", "adasvd:global-fisher:keep_dense_above=0.9:refine=block"
    seeds = {(r["row"], r["ratio"], r.get("seed", 0)): r["ppl"]
             for r in json.loads((ROOT / "docs/results/quality-smollm2.json").read_text())
             if "validation" in r["setting"] and r["setting"].startswith("calib 16x256")}
    for q in (0.2, 0.4, 0.6):
        assert q <= GLOBAL_FISHER_UP_TO
        assert all(seeds[fisher, q, seed] < seeds[adacr, q, seed] for seed in (0, 1))


@pytest.fixture
def resolved(tmp_path, monkeypatch):
    """CLI arguments -> the RunConfig the CLI settles on for a tiny Llama checkpoint (the run itself skipped)."""
    from onnx_helpers import tiny_model_dir
    model = tiny_model_dir("llama", tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    seen = {}
    monkeypatch.setattr("exporter.run.run", lambda config, **_: seen.update(config=config))

    def settle(*args):
        result = CliRunner().invoke(main, ["--model", str(model), "--calib-data", str(text), "--calib-samples", "8",
                                           "--calib-seqlen", "32", "--out", str(tmp_path / "out"), "-q", *args])
        assert result.exit_code == 0, result.output
        return seen.pop("config")
    return settle


def test_the_default_ends_with_end_to_end_refinement_where_its_memory_formula_fits(resolved, tmp_path, monkeypatch):
    """block+e2e on E2E_SAMPLES windows of the calibration text where refine/memory.py's formula fits the
    device; block alone, and the recipe's name says why, where it does not, where those windows are too short,
    with --quantize gptq's grid and with generated calibration text; a --refine or --method the user gave is
    never changed."""
    from exporter.recipe import E2E_SAMPLES
    short = resolved()  # windows of 32 tokens: shorter than any e2e gained anything on
    assert short.compression.refine == "block" and "windows of 32 tokens" in short.compression.recipe
    monkeypatch.setattr("exporter.recipe.E2E_MIN_SEQLEN", 32)
    fits = resolved()
    assert (fits.compression.refine, fits.compression.recipe) == ("block+e2e", "default")
    assert (fits.e2e_data.samples, fits.e2e_data.seqlen, fits.e2e_data.source) == (E2E_SAMPLES, 32,
                                                                                   str(tmp_path / "text.txt"))
    assert recipe_name(fits.compression).endswith("refine block+e2e")
    # its steps: one pass over the training windows (E2E_SAMPLES of them in batches of one, 1/8 held out), on every
    # rank a step (torchrun's WORLD_SIZE), never fewer than --refine-steps; --e2e-steps as given
    assert fits.compression.e2e_refinement.steps == E2E_SAMPLES - E2E_SAMPLES // 8 == 224
    assert resolved("--refine-steps", "300").compression.e2e_refinement.steps == 300
    assert resolved("--e2e-steps", "96").compression.e2e_refinement.steps == 96
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolved().compression.e2e_refinement.steps == 75  # ⌈224 / 3⌉
    monkeypatch.delenv("WORLD_SIZE")
    for args, why in ((["--format", "onnx", "--quantize", "int4"], "--quantize gptq"),
                      (["--calib-data", "generated"], "generated calibration text")):
        config = resolved(*args)
        assert config.compression.refine == "block" and config.e2e_data is None
        assert config.compression.recipe.startswith("default (block only: ") and why in config.compression.recipe
    assert resolved("--refine", "block").compression.refine == "block"
    for args, samples in ((["--e2e-steps", "96"], E2E_SAMPLES), (["--e2e-lr", "0.003"], E2E_SAMPLES),
                          (["--e2e-samples", "24"], 24)):  # e2e settings given: its e2e
        config = resolved(*args)
        assert (config.compression.refine, config.compression.recipe) == ("block+e2e", "default")
        assert config.e2e_data.samples == samples and config.e2e_data.allow_overlap == (samples == E2E_SAMPLES)
        assert config.compression.e2e_refinement.lr == (0.003 if "--e2e-lr" in args else 1e-3)
    monkeypatch.setattr("exporter.load.open.available_bytes", lambda device: 1000)
    tight = resolved()  # the numbers go to the log, not into the recipe: it is part of --resume's settings
    assert tight.compression.refine == "block" and "end-to-end refinement does not fit cpu" in tight.compression.recipe


def test_the_default_allocates_with_global_fisher_up_to_its_ratio(resolved, monkeypatch):
    """global-fisher up to GLOBAL_FISHER_UP_TO, on any device (its backward pass walks one decoder layer at a
    time, plan/sensitivity.py); adaCR above that ratio and for a --budget that comes to a ratio above it, the
    recipe's name saying why; an --allocation the user gave is never changed."""
    assert resolved("--ratio", "0.6").compression.allocation_name == "global-fisher"
    assert resolved("--ratio", "0.8").compression.allocation_name == "adacr"
    monkeypatch.setattr("exporter.preflight.check_budget", lambda config, model_config: 0.7)
    budget = resolved("--budget", "1MB").compression  # a budget that comes to ratio 0.7
    assert budget.allocation_name == "adacr" and "a --budget of ratio 0.700, above 0.6" in budget.recipe
    monkeypatch.setattr("exporter.preflight.check_budget", lambda config, model_config: 0.5)
    assert resolved("--budget", "1MB").compression.allocation_name == "global-fisher"
    assert resolved("--ratio", "0.2", "--allocation", "uniform").compression.allocation_name == "uniform"
    monkeypatch.setattr("exporter.load.open.available_bytes", lambda device: 1000)
    tight = resolved("--ratio", "0.2").compression
    assert tight.allocation_name == "global-fisher"  # no whole-model pass to fit any more
    assert tight.recipe.startswith("default (block only: ")  # the e2e check's own reason: it does not fit
