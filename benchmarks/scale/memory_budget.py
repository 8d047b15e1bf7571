"""Peak memory of one compression-pass step, from the formulas in docs/scale.md, for real model shapes:
what sits on the compute device (GPU) and what the host keeps. Prints a Markdown table; writes
docs/results/memory-budget.md.

    python -m benchmarks.scale.memory_budget

The formulas follow the code: one decoder layer materialised in the compute dtype; its input statistics
(X Xᵀ in float64 per distinct input, or the tokens themselves while fewer than the input features);
the factorization of the one matrix in flight (float64 work: W, W·C, the smallest Gram of WX and its
eigenvectors, a root of C when the output side is the larger); one calibration batch; on the host, the
activation streams. Measured values on this CPU are in docs/results/scale.md.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import RESULTS, module_name

GB = 1e9
F64 = 8


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    gated: bool  # Llama's gate/up/down (3 MLP matrices) or OPT's fc1/fc2

    def matrices(self) -> list[tuple[str, int, int, int]]:
        """(name, out m, in n, input group) of every linear of one decoder layer."""
        head = self.hidden // self.heads
        kv = self.kv_heads * head
        attn = [("q", self.hidden, self.hidden, 0), ("k", kv, self.hidden, 0), ("v", kv, self.hidden, 0),
                ("o", self.hidden, self.hidden, 1)]
        if self.gated:
            return attn + [("gate", self.ffn, self.hidden, 2), ("up", self.ffn, self.hidden, 2),
                           ("down", self.hidden, self.ffn, 3)]
        return attn + [("fc1", self.ffn, self.hidden, 2), ("fc2", self.hidden, self.ffn, 3)]

    def layer_params(self) -> int:
        return sum(m * n for _, m, n, _ in self.matrices())

    def group_dims(self) -> list[int]:
        dims = {}
        for _, _, n, g in self.matrices():
            dims[g] = n
        return list(dims.values())


SHAPES = [
    Shape("OPT-6.7B", 4096, 16384, 32, 32, 32, 50272, False),
    Shape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000, True),
    Shape("Llama-2-13B", 5120, 13824, 40, 40, 40, 32000, True),
    Shape("Llama-3-70B", 8192, 28672, 64, 8, 80, 128256, True),
]


def statistics_bytes(shape: Shape, tokens: int, two_streams: bool, bytes_compute: int) -> int:
    """X Xᵀ per distinct input in float64, or while there are fewer tokens than features the tokens
    themselves, as observed (in the compute dtype); adaComp's second stream doubles either (X_c X_oᵀ, or the
    X_o tokens: of X_o it keeps only ‖W X_o‖² otherwise, a number per linear)."""
    streams = 2 if two_streams else 1
    return sum((tokens * n * bytes_compute if tokens <= n else n * n * F64) * streams for n in shape.group_dims())


def factorization_bytes(m: int, n: int, tokens: int, adacomp: bool) -> int:
    """float64 work for one matrix: W, W·C (Gram path), the smallest Gram of WX and its eigenvectors (×2 for
    the solver's workspace), a root of C when m > n; adaComp: its two n×r products with C_c and X_c X_oᵀ and
    the new factors (r ≤ min(m, n); it factorizes r×r matrices only)."""
    k = min(m, n, tokens)
    work = m * n + 2 * k * k * 2
    if tokens > n:
        work += m * n  # W·C
        if m > n:
            work += 2 * n * n + m * n  # the root of C (basis, root) and D = W·S
    if adacomp:
        work += (2 * n + m + n) * min(m, n)
    return work * F64


def device_peak(shape: Shape, method: str, tokens: int, batch_tokens: int, bytes_compute: int) -> dict:
    two = method == "adasvd"
    layer = shape.layer_params() * bytes_compute
    stats = statistics_bytes(shape, tokens, two, bytes_compute)
    fact = max(factorization_bytes(m, n, tokens, two) for _, m, n, _ in shape.matrices())
    batch = batch_tokens * max(shape.hidden, shape.ffn) * bytes_compute * 4  # hidden, MLP intermediate, copies
    return {"layer": layer, "statistics": stats, "factorization": fact, "batch": batch,
            "total": layer + stats + fact + batch}


def host_streams(shape: Shape, method: str, calib_tokens: int, eval_tokens: int, bytes_compute: int) -> int:
    calib = calib_tokens * shape.hidden * bytes_compute * (2 if method == "adasvd" else 1)
    return calib + 2 * eval_tokens * shape.hidden * bytes_compute  # dense and compressed evaluation streams


def whole_model(shape: Shape, bytes_compute: int) -> int:
    return (shape.layers * shape.layer_params() + 2 * shape.vocab * shape.hidden) * bytes_compute


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calib", default="256x2048", help="samples x seqlen (the papers' default)")
    p.add_argument("--eval-tokens", type=int, default=300_000, help="wikitext-2 test is ~300k tokens")
    p.add_argument("--out", default=str(RESULTS / "memory-budget.md"))
    a = p.parse_args()
    samples, seqlen = (int(x) for x in a.calib.split("x"))
    tokens = samples * seqlen
    lines = [f"# Peak memory of the compression pass (formulas; calibration {a.calib}, GPU in bf16)", "",
             f"Command: `python -m {module_name()} --calib {a.calib} --eval-tokens {a.eval_tokens}`", "",
             "Device = one layer (bf16) + its statistics (float64) + the matrix in flight (float64 work) + one "
             "calibration batch; host = the activation streams (bf16). The gradient allocations and FWSVD need "
             "the whole model on the device instead.", "",
             "| model | method | layer GB | statistics GB | factorization GB | device peak GB | host streams GB | "
             "whole model (gradient allocations) GB |", "|---|---|---|---|---|---|---|---|"]
    for shape in SHAPES:
        for method in ("svd-llm-v2", "adasvd"):
            d = device_peak(shape, method, tokens, seqlen, 2)
            host = host_streams(shape, method, tokens, a.eval_tokens, 2)
            lines.append(f"| {shape.name} | {method} | {d['layer'] / GB:.1f} | {d['statistics'] / GB:.1f} | "
                         f"{d['factorization'] / GB:.1f} | {d['total'] / GB:.1f} | {host / GB:.1f} | "
                         f"{whole_model(shape, 2) / GB:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
