"""The interface every factorization method implements, and the registry.

A method turns one weight plus the statistics of its input into low-rank factors (up: out×r,
down: r×in, W ≈ up @ down). Everything else (data, hooks, the layer loop, ranks, the swap) lives
elsewhere. A new method is one new file in this folder with one @register'd class.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import torch

from ..calibration.stats import InputStats
from ..linalg import (descending_eigh, descending_eigvalsh, input_side_gram, lift_to_output, output_gram,
                      truncation_loss)


@dataclass
class MatrixInput:
    """One weight to factorize and what was observed about its input. The expensive products are cached
    here so that the spectrum (for the report and allocations), the loss-optimal directions and the loss of
    the stored factors share them. Two representations of the input (calibration/stats.py): the tokens X
    themselves while there are fewer of them than input features (then WX, m×N, is at hand), else C."""
    name: str
    weight: torch.Tensor  # out×in, float64, on the compute device
    stats: InputStats

    @property
    def output_side(self) -> bool:
        """Gram path: work with the m×m Gram W C Wᵀ (m ≤ n), else with the n×n one through a root of C."""
        m, n = self.weight.shape
        return m <= n

    @cached_property
    def wx(self) -> torch.Tensor | None:
        """W X (m×N) when the tokens were kept, else None."""
        tokens = self.stats.tokens
        return None if tokens is None else self.weight @ tokens.T

    @cached_property
    def _wx_svd(self) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, _ = torch.linalg.svd(self.wx, full_matrices=False)
        return u, s

    @cached_property
    def weight_gram(self) -> torch.Tensor:
        """W·C (m×n): the one m·n² product of the Gram path."""
        return self.weight @ self.stats.gram

    @cached_property
    def _eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        gram = (output_gram(self.weight, self.stats.gram, self.weight_gram) if self.output_side
                else input_side_gram(self.weight, self.stats.root))
        return descending_eigh(gram)

    @cached_property
    def spectrum(self) -> torch.Tensor:
        """σ(WX), descending, length min(m, n): the truncation-loss spectrum (zeros past rank(X)).
        Eigenvalues only, unless the eigenvectors were already computed."""
        size = min(self.weight.shape)
        if self.wx is not None:
            s = self._wx_svd[1]
            return torch.cat([s, s.new_zeros(max(size - len(s), 0))])[:size]
        if "_eigh" in self.__dict__:
            values = self._eigh[0]
        elif self.output_side:
            values = descending_eigvalsh(output_gram(self.weight, self.stats.gram, self.weight_gram))
        else:
            values = descending_eigvalsh(input_side_gram(self.weight, self.stats.root))
        return values[:size].sqrt()

    def top_directions(self, rank: int) -> torch.Tensor:
        """P_r: the top-`rank` left singular vectors of WX (m×rank, orthonormal)."""
        if self.wx is not None:
            u = self._wx_svd[0]
            if rank <= u.shape[1]:
                return u[:, :rank]
            # Past rank(X) every direction costs nothing on the data: take those that keep most of W.
            rest = self.weight - u @ (u.T @ self.weight)
            extra = torch.linalg.svd(rest, full_matrices=False)[0][:, : rank - u.shape[1]]
            return torch.cat([u, extra], dim=1)
        values, vectors = self._eigh
        if self.output_side:
            return vectors[:, :rank]
        lifted = lift_to_output(self.weight, self.stats.root, values, vectors, rank)
        if lifted is not None:
            return lifted
        values, vectors = descending_eigh(output_gram(self.weight, self.stats.gram, self.weight_gram))
        return vectors[:, :rank]

    def min_loss(self, rank: int) -> float:
        """The theoretical minimum √Σ_{i>r} σ_i(WX)². On the Gram path as √(tr(W C Wᵀ) − Σ_{i≤r} σ_i²), from
        the same raw C as loss(): when few calibration tokens leave C singular, its rounding noise then
        cancels between the two instead of telling them apart."""
        kept = float(self.spectrum[:rank].to(torch.float64).square().sum())
        if self.wx is not None:
            energy = float(self.wx.square().sum())
        else:
            energy = float((self.weight_gram * self.weight.to(self.weight_gram.dtype)).sum())
        return max(energy - kept, 0.0) ** 0.5

    def loss(self, up: torch.Tensor, down: torch.Tensor) -> float:
        """‖WX − up·down·X‖_F for the factors as given (pass them as stored)."""
        if self.wx is not None:
            approx = up.to(torch.float64) @ (down.to(torch.float64) @ self.stats.tokens.T)
            return float(torch.linalg.norm(self.wx - approx))
        return truncation_loss(self.weight, up, down, self.stats.gram, self.weight_gram)


class Method:
    name: ClassVar[str]
    # Extra statistics the layer loop must collect: "abs_mean", "cross", "fisher".
    needs: ClassVar[frozenset[str]] = frozenset()

    def prepare(self, model, batches, matrices, device) -> None:
        """Whole-model work before the layer loop (e.g. Fisher information). Default: nothing."""

    def factorize(self, m: MatrixInput, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def report(self, name: str, m: MatrixInput, up: torch.Tensor, down: torch.Tensor, extra: dict) -> None:
        """Add method-specific per-matrix entries to the report. Default: nothing."""


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str, **options) -> Method:
    import importlib
    import pkgutil
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name != "base":
            importlib.import_module(f"{__package__}.{info.name}")  # each file registers its method
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**options)
