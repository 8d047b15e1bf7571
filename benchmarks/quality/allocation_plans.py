"""Where each allocation puts the ranks on SmolLM2-135M: the kept fraction of parameters per matrix type and
per decoder layer, for every allocation and ratio asked, from one profile and one gradient pass (no
compression, no evaluation). Same calibration as benchmarks/quality/smollm2.py. Writes
docs/results/allocation-plans.md.

    python -m benchmarks.quality.allocation_plans --ratios 0.2,0.8 --allocations adacr,global-fisher,global-fisher-per-type
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import RESULTS, calibration, command_line, smollm2
from exporter.loop.profile import measure_profile
from exporter.model.candidates import list_matrices
from exporter.model.discovery import architecture_of
from exporter.plan import allocate
from exporter.plan.ranks import plan_params


def kept(matrices, plan) -> float:
    """Kept fraction of the dense parameters of `matrices` under `plan` (dense where absent)."""
    dense = sum(m.dense_params for m in matrices)  # > 0: every group below holds at least one linear
    return plan_params(matrices, plan) / dense


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", default="0.2,0.8")
    p.add_argument("--allocations", default="adacr,global-fisher,global-fisher-per-type")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--out", default=str(RESULTS / "allocation-plans.md"))
    a = p.parse_args()
    command = command_line()

    model, tokenizer = smollm2()
    arch = architecture_of(model)
    batches = calibration(model, tokenizer, a.calib_samples, a.calib_seqlen, seed=0)
    matrices = list_matrices(model, arch)
    allocations = a.allocations.split(",")
    profile = measure_profile(model, batches, allocations, "cpu")  # what these allocations need, measured once

    kinds = list(dict.fromkeys(m.kind for m in matrices))
    layers = sorted({m.layer for m in matrices})
    by_type, by_layer = [], []
    for ratio in [float(r) for r in a.ratios.split(",")]:
        for name in allocations:
            plan = allocate(name, matrices, profile, ratio)  # each allocation's defaults, as the CLI
            by_type.append((ratio, name, [kept([m for m in matrices if m.kind == k], plan) for k in kinds]))
            by_layer.append((ratio, name, [kept([m for m in matrices if m.layer == i], plan) for i in layers]))
            print(f"{name} @{ratio}: " + ", ".join(f"{k} {v:.2f}" for k, v in zip(kinds, by_type[-1][2])), flush=True)

    lines = ["# Where the allocations put the ranks (SmolLM2-135M)", "",
             f"Command: `{command}`", "",
             f"Calibration {a.calib_samples} × {a.calib_seqlen} tokens of wiki.valid.tokens (seed 0), as in "
             "quality-smollm2.md. Each cell is the kept fraction of the dense parameters (1 − ratio) of that "
             "group; the target is 1 − ratio overall.", "",
             "## Per matrix type", "",
             "| ratio | allocation | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    lines += [f"| {r} | {n} | " + " | ".join(f"{v:.2f}" for v in vals) + " |" for r, n, vals in by_type]
    lines += ["", "## Per decoder layer", "",
              "| ratio | allocation | " + " | ".join(str(i) for i in layers) + " |",
              "|---|---|" + "---|" * len(layers)]
    lines += [f"| {r} | {n} | " + " | ".join(f"{v:.2f}" for v in vals) + " |" for r, n, vals in by_layer]
    Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
