"""The default recipe: what `svd-export --model X --ratio R` runs when no --method is given, the best recipe
measured on validation text (`python -m benchmarks.quality.smollm2 --split validation`,
docs/results/quality-smollm2-validation.md: SmolLM2-135M, calibration from the first 75% of
wiki.valid.tokens, perplexity on the rest, one seed). AdaSVD with its adaCR allocation leads SVD-LLM V2 with
its own allocation at every ratio measured there: 30.42 vs 38.12 at 0.2, 43.68 vs 77.52 at 0.4, 72.45 vs
241.17 at 0.6, 141.19 vs 1733.96 at 0.8 (dense 17.13). Its adaComp strength β = 0.25 leads 0.1, 0.5 and the
paper's 1.0 on the same text at 0.4 (docs/adasvd.md). Block refinement (`--refine block`, 64 steps) on top
of it is better again at every ratio: 29.09 / 41.01 / 65.13 / 124.29, so the default refines. It holds out
calibration batches to stop early, so it needs two batches at least: with a single one the default runs
without it and says so in its name ("default, no refine (1 calibration batch): adasvd + adacr"). A matrix
whose planned rank keeps at least 90% of its parameters stays dense (`--keep-dense-above 0.9`, its budget
going to the others): 30.42 → 28.63 at 0.2 and 43.68 → 42.98 at 0.4; 0.95 gives 28.68 and 42.98. With
refinement, the whole default gives 62.04 and 124.29 at 0.6 and 0.8 (refinement alone: 65.13 and 124.29),
and 37.39 at 0.4. End-to-end refinement after it (`--refine block+e2e`) gave the same 37.39 at 0.4 on the 16
calibration sequences (its held-out KL never improved after block refinement), but on 64 windows of its own it
gives 33.51 and 33.83 on two seeds against 37.39 and 39.81 (docs/quality.md, "End-to-end refinement's data"):
the run ends with it wherever its memory formula fits the device (preflight.settle_default_refinement), on at
least E2E_SAMPLES windows of the calibration text (256 measured better than 64 at 0.2 and 0.4, both seeds),
where they are E2E_MIN_SEQLEN tokens long at least, for one pass over them (E2E_PASSES; better than 64 steps at
0.2 and 0.4, both seeds).

The allocation: up to ratio 0.6 the default allocates with global-fisher (one greedy over all linears, each
weighted by its output's loss gradient: docs/global-allocation.md) instead of adaCR: with keep-dense 0.9 and
block refinement both, validation 22.81 against 26.67 at 0.2, 36.41 against 37.39 at 0.4 and 60.56 against
62.04 at 0.6 (seed 0; seed 1 in docs/quality.md, "Allocation", led too); its per-type variant gives 40.27 at
0.4. Above 0.6 (not measured with global-fisher) adaCR stays. Its loss gradients come from a backward pass that
walks one decoder layer at a time (plan/sensitivity.py), so the default streams a 70B model with it too.

Every paper recipe stays one flag away: `--method svd-llm-v2` is SVD-LLM V2 with its own allocation,
`--method adasvd` AdaSVD with adaCR, neither refined.
"""
from __future__ import annotations

import dataclasses

from .config import CalibrationConfig, CompressionConfig, held_out_count

KEEP_DENSE_ABOVE = 0.9  # --keep-dense-above of the default, measured on validation text (above)
# The default's allocation up to this ratio: global-fisher (the greedy of exporter/plan/greedy.py weighted by each
# linear's loss gradient, plan/sensitivity.py), adaCR above it (preflight.settle_default_allocation: a --budget
# counts as the ratio it comes to; docs/quality.md, "Allocation").
GLOBAL_FISHER_UP_TO = 0.6
# The default's last step, where it fits (preflight.settle_default_refinement): end-to-end refinement after block
# refinement, on at least this many windows of the calibration text (its own data, beside the calibration
# batches; overlapping where the text is short). On validation (the global-fisher default, 256-token windows,
# 64 steps), seeds 0 / 1: 256 windows give 21.26 / 21.73 at 0.2 and 30.13 / 30.45 at 0.4 against 64 windows'
# 21.41 / 21.85 and 31.88 / 32.45; 16 (the calibration batches) gained nothing after block refinement
# (docs/quality.md, "End-to-end refinement's data").
E2E_SAMPLES = 256
# ... and only on windows of this many tokens at least: 64 windows of 64 tokens (the README's first command:
# docs/results/first-run.md, held-out KL flat for 24 steps) changed nothing while they doubled that command's
# time; every gain was measured on windows of 256 tokens or more.
E2E_MIN_SEQLEN = 256
# ... for one pass over its training batches (the held-out ones apart; under torchrun each step takes one batch on
# every rank), never fewer steps than --refine-steps. On validation (256 windows of 256 tokens in batches of 2, 16
# held out: 112 steps), seeds 0 / 1: 20.80 / 21.01 at 0.2 and 29.09 / 29.88 at 0.4, against 21.26 / 21.73 and
# 30.13 / 30.45 for 64 steps, which saw 128 of the 224 training windows (docs/quality.md, "One pass").
E2E_PASSES = 1


def default_compression(ratio: float, calibration_batches: int) -> dict:
    """CompressionConfig fields of the default recipe at `ratio` (the ratio itself excluded), for a calibration
    set of `calibration_batches` batches."""
    closed_form = {"method": "adasvd", "keep_dense_above": KEEP_DENSE_ABOVE,
                   **({"allocation": "global-fisher"} if 0 < ratio <= GLOBAL_FISHER_UP_TO else {})}  # 0: GPTQ alone
    if calibration_batches < 2:  # refinement's early stopping holds out a batch, and trains on the others
        return {**closed_form, "recipe": f"default, no refine ({calibration_batches} calibration batch)"}
    return {**closed_form, "refine": "block", "recipe": "default"}


def e2e_data(calibration: CalibrationConfig, source: str | None = None, samples: int | None = None,
             seqlen: int | None = None, default: bool = True) -> CalibrationConfig | None:
    """The sequences end-to-end refinement trains on, from --e2e-data/-samples/-seqlen (None each: the
    calibration's); `default`: the default recipe's e2e, on E2E_SAMPLES windows of the calibration text at
    least (overlapping where the text is short) unless `samples` says otherwise. None: the calibration batches
    themselves."""
    count = samples or (max(calibration.samples, E2E_SAMPLES) if default else calibration.samples)
    own = dataclasses.replace(calibration, source=source or calibration.source, samples=count,
                              seqlen=seqlen or calibration.seqlen,
                              allow_overlap=calibration.allow_overlap or (default and samples is None))
    same = (own.source, own.samples, own.seqlen) == (calibration.source, calibration.samples, calibration.seqlen)
    return None if same else own


def e2e_steps(batches: int, holdout: float, world: int, at_least: int) -> int:
    """Adam steps of the default's end-to-end refinement on `batches` batches (all ranks'), `holdout` of them held
    out, on `world` processes: E2E_PASSES passes over the training batches, `at_least` steps at least."""
    train = batches - held_out_count(batches, holdout)
    return max(at_least, E2E_PASSES * -(-train // max(world, 1)))  # guard: a world of 0 is one process


def recipe_name(config: CompressionConfig) -> str:
    """How the summary and report.json name what ran, e.g. "default: adasvd + adacr + keep dense above 0.9 +
    refine block"."""
    if config.ratio == 0 and config.budget_bytes is None:  # --quantize alone: nothing is factorized or refined
        return "no low rank (--ratio 0)" + (f": GPTQ int{config.quantization.bits}" if config.quantization else "") + (
            f" + rank-{config.correction_rank} corrections" if config.correction_rank else "")
    parts = [config.method, config.allocation_name]
    if config.keep_dense_above < 1:
        parts.append(f"keep dense above {config.keep_dense_above:g}")
    if config.refine != "none":
        parts.append("refine " + config.refine)
    return (f"{config.recipe}: " if config.recipe else "") + " + ".join(parts)
