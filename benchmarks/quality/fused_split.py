"""Fused projection: compress it as one matrix, or split it along its outputs? Measured on SmolLM2-135M.

Phi-3's qkv_proj and gate_up_proj, GPT-2's c_attn and every MoE expert's gate_up_proj are the stack of
matrices that read one input. SmolLM2 keeps them apart (q/k/v, gate/up) but with the same shared input,
so stacking its matrices gives the fused case on real weights and real statistics:
    fused  [W_1; …; W_J] (Σm_j × n) at rank r: r·(Σm_j + n) parameters, one `down` factor for all parts;
    split  each W_j at its own rank r_j: Σ r_j·(m_j + n) parameters (cheaper `up`, one `down` per part).
Both at the same budget, (1 − ratio)·Σ m_j·n parameters. The loss is the optimal (SVD-LLM V2) truncation
loss on the calibration statistics, ‖(W − W')X‖_F² = Σ_{i>r} σ_i(W S)², S the shared whitening, summed
over the decoder layers. Split ranks: `uniform` gives every part the ratio (what the pipeline's uniform
allocation would do); `best` spends the budget greedily on the largest σ²/(m_j + n) across the parts.
Writes docs/results/fused-split.md.

    OMP_NUM_THREADS=1 python -m benchmarks.quality.fused_split --ratios 0.2,0.4,0.6,0.8
"""
from __future__ import annotations

import argparse
import heapq
import math
from pathlib import Path

import torch

from benchmarks.common import RESULTS, calibration, command_line, smollm2
from exporter.factorize.base import MatrixInput
from exporter.load.resident import ResidentSource
from exporter.loop.observe import observe
from exporter.model.layer_inputs import capture_inputs

FUSED = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "gate_up": ("mlp.gate_proj", "mlp.up_proj")}


def tail(s: torch.Tensor, rank: int) -> float:
    """Σ_{i≥rank} s_i²: the squared loss of keeping the first `rank` singular values."""
    return float(s[rank:].square().sum())


def fused_loss(s: torch.Tensor, rows: int, cols: int, budget: float) -> float:
    return tail(s, min(int(budget // (rows + cols)), len(s)))


def split_uniform_loss(parts: list[tuple[torch.Tensor, int]], cols: int, keep: float) -> float:
    return sum(tail(s, min(int(keep * m * cols / (m + cols)), len(s))) for s, m in parts)


def split_best_loss(parts: list[tuple[torch.Tensor, int]], cols: int, budget: float) -> float:
    """Greedy: the next rank goes to the part with the largest σ²/(m_j + n) that still fits the budget."""
    ranks = [0] * len(parts)
    heap = [(-float(s[0]) ** 2 / (m + cols), j) for j, (s, m) in enumerate(parts)]
    heapq.heapify(heap)
    spent = 0.0
    while heap:
        _, j = heapq.heappop(heap)
        s, m = parts[j]
        if spent + m + cols > budget:
            continue
        spent += m + cols
        ranks[j] += 1
        if ranks[j] < len(s):
            heapq.heappush(heap, (-float(s[ranks[j]]) ** 2 / (m + cols), j))
    return sum(tail(s, r) for (s, _), r in zip(parts, ranks))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", default="0.2,0.4,0.6,0.8")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--out", default=str(RESULTS / "fused-split.md"))
    a = p.parse_args()
    command = command_line()
    ratios = [float(r) for r in a.ratios.split(",")]

    model, tokenizer = smollm2()
    batches = calibration(model, tokenizer, a.calib_samples, a.calib_seqlen, seed=0)
    # (fused type, ratio) -> [Σ loss² fused, split uniform, split best, per-layer min(fused, split best),
    #                         layers where split best < fused]
    totals = {(kind, r): [0.0, 0.0, 0.0, 0.0, 0] for kind in FUSED for r in ratios}

    source = ResidentSource(model, "cpu")
    stream = capture_inputs(model, source.arch, batches, "cpu")
    for index, layer in source.layers():  # σ(WX) of each matrix on the inputs the dense layers propagate
        obs = observe(index, layer, source.arch, stream, "cpu")
        stats = {path: s for group, s in zip(source.arch.groups_of(index), obs.stats) for path in group.linears}
        for kind, paths in FUSED.items():
            weights = [layer.get_submodule(path).weight.detach().to(torch.float64) for path in paths]
            fused = MatrixInput(kind, torch.cat(weights), stats[paths[0]]).spectrum
            parts = [(MatrixInput(path, w, stats[path]).spectrum, w.shape[0]) for path, w in zip(paths, weights)]
            rows, cols = sum(w.shape[0] for w in weights), weights[0].shape[1]
            for r in ratios:
                budget = (1 - r) * rows * cols
                f, su, sb = (fused_loss(fused, rows, cols, budget), split_uniform_loss(parts, cols, 1 - r),
                             split_best_loss(parts, cols, budget))
                t = totals[(kind, r)]
                t[0] += f
                t[1] += su
                t[2] += sb
                t[3] += min(f, sb)
                t[4] += sb < f
    layers = source.num_layers
    lines = ["# Fused projection: one matrix or split along its outputs", "",
             f"`{command}`", "",
             f"SmolLM2-135M, calibration {a.calib_samples} × {a.calib_seqlen} tokens of wiki.valid.tokens. "
             "Optimal truncation loss √Σ‖(W − W')X‖² over the "
             f"{layers} decoder layers, at equal parameter budget; split/fused < 1 means splitting is better "
             "(see the script's docstring for the definitions).", "",
             "| matrix | ratio | fused | split, uniform ratio | split, best ranks | split best / fused "
             "| layers where split best wins | better of the two per layer / fused |",
             "|---|---|---|---|---|---|---|---|"]
    def relative(loss: float, fused: float) -> str:  # fused 0: the budget keeps all of WX (few tokens), no ratio
        return f"{math.sqrt(loss / fused):.3f}" if fused > 0 else "–"

    for (kind, r), (f, su, sb, either, wins) in totals.items():
        lines.append(f"| {'+'.join(p.rsplit('.', 1)[-1] for p in FUSED[kind])} | {r} | {math.sqrt(f):.2f} | "
                     f"{math.sqrt(su):.2f} | {math.sqrt(sb):.2f} | {relative(sb, f)} | {wins}/{layers} "
                     f"| {relative(either, f)} |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
