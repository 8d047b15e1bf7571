"""What the layer loop hands back: the rank plan as factorized, each matrix's loss against its minimum, the
per-layer measurements, and the report entries of the method and of refinement. JSON-able through the
resume state, so a resumed run reports what the killed run measured."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..model.candidates import Matrix


@dataclass
class MatrixRecord:
    rank: int
    loss: float  # ‖WX − W'X‖_F on the calibration statistics the method saw, factors as stored
    loss_min: float  # √Σ_{i>r} σ_i(WX)²: the best any rank-r factorization can do on the same X
    shape: tuple[int, int]


@dataclass
class CompressionResult:
    method: str
    allocation: str
    ratio: float
    plan: dict[str, int]
    matrices: list[Matrix]
    records: dict[str, MatrixRecord] = field(default_factory=dict)
    layer_similarity: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # method-specific report entries (e.g. adaComp losses)
    # seconds per layer: "profile" and "compress" (the passes); inside "compress": "observe" (forward passes of
    # the calibration streams and their statistics), "factorize" (the method), "refine" (--refine block)
    layer_seconds: dict[str, list[float]] = field(default_factory=dict)

    def linear_params(self) -> tuple[int, int]:
        """(dense, compressed) parameter counts over all candidate linears, --correction-rank's pairs included."""
        dense = sum(m.dense_params for m in self.matrices)
        corrections = self.extra.get("corrections", {})
        after = sum((self.plan[m.name] * m.params_per_rank if m.name in self.plan else m.dense_params)
                    + corrections.get(m.name, 0) * m.params_per_rank for m in self.matrices)
        return dense, after

    def layer_ratios(self) -> list[float]:
        """Realised ratio of each decoder layer over its candidate linears (a dense one removes nothing)."""
        ratios = []
        for layer in sorted({m.layer for m in self.matrices}):
            group = [m for m in self.matrices if m.layer == layer]
            after = sum(self.plan[m.name] * m.params_per_rank if m.name in self.plan else m.dense_params
                        for m in group)
            ratios.append(1.0 - after / sum(m.dense_params for m in group))  # dense_params > 0 for any linear
        return ratios


def restore_result(result: CompressionResult, state: dict) -> None:
    result.records = {k: MatrixRecord(v["rank"], v["loss"], v["loss_min"], tuple(v["shape"]))
                      for k, v in state.get("records", {}).items()}
    result.layer_similarity = list(state.get("compress_similarity", []))
    result.extra = state.get("extra", {})
    result.layer_seconds = {k: list(v) for k, v in state.get("layer_seconds", {}).items()}
