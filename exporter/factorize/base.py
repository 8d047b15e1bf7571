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

from .linalg import descending_eigh, descending_eigvalsh, output_gram, symmetric, truncation_loss
from .stats import InputStats


@dataclass
class MatrixInput:
    """One weight to factorize and what was observed about its input. The expensive products are cached
    here so that the spectrum (for the report and allocations), the loss-optimal directions and the loss of
    the stored factors share them.

    Everything below is (WX)(WX)ᵀ seen through its smallest Gram: W C Wᵀ (m×m) when m is the smallest side;
    else DᵀD for a factor D with D Dᵀ = W C Wᵀ — D = WX (m×N) when the tokens were kept (N ≤ n), or
    D = W S (m×n) with S Sᵀ = C shared by the linears of one input.

    The weight's dtype is the dtype of every product here: float64 to factorize; float32 where only the
    spectrum is wanted (the allocation's profile pass: exporter/loop/profile.py, PROFILE_DTYPE). The statistics
    stay float64 sums and are cast to it."""
    name: str
    weight: torch.Tensor  # out×in, float64 (or float32 for a spectrum), on the compute device
    stats: InputStats

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.weight.dtype)  # the same tensor, no copy, in float64

    @cached_property
    def _gram(self) -> torch.Tensor:
        return self._cast(self.stats.gram)

    @cached_property
    def factor(self) -> torch.Tensor | None:
        """D with D Dᵀ = (WX)(WX)ᵀ, or None when the m×m Gram W C Wᵀ is the smallest object."""
        m, n = self.weight.shape
        if self.stats.tokens is not None:
            return self.stats.project(self.weight)
        return None if m <= n else self.weight @ self._cast(self.stats.root)

    @cached_property
    def weight_gram(self) -> torch.Tensor:
        """W·C (m×n): the one m·n² product of the Gram path."""
        return self.weight @ self._gram

    @cached_property
    def _output_side(self) -> bool:
        """Whether the smallest Gram of WX is the output-side one, D Dᵀ = W C Wᵀ (m×m), rather than DᵀD."""
        d = self.factor
        return d is None or d.shape[0] <= d.shape[1]

    def _small_gram(self) -> torch.Tensor:
        """The smallest Gram of WX; not kept (its eigenpairs or eigenvalues replace it)."""
        d = self.factor
        if d is None:
            return output_gram(self.weight, self._gram, self.weight_gram)
        return symmetric(d @ d.T, d.dtype) if self._output_side else symmetric(d.T @ d, d.dtype)

    @cached_property
    def _eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        return descending_eigh(self._small_gram())

    @cached_property
    def spectrum(self) -> torch.Tensor:
        """σ(WX), descending, length min(m, n): the truncation-loss spectrum (zeros past rank(WX)).
        Eigenvalues only, unless the eigenvectors were already computed."""
        values = self._eigh[0] if "_eigh" in self.__dict__ else descending_eigvalsh(self._small_gram())
        size = min(self.weight.shape)
        values = torch.cat([values, values.new_zeros(max(size - len(values), 0))])
        return values[:size].sqrt()

    def top_directions(self, rank: int) -> torch.Tensor:
        """P_r: the top-`rank` left singular vectors of WX (m×rank, orthonormal). Past the numerical rank of
        WX every direction costs nothing on the calibration data; those kept are the ones that keep most of
        W, so W' = P_r P_rᵀ W is never further from W than it has to be."""
        values, vectors = self._eigh
        self.spectrum  # noqa: B018 -- cached from these eigenvalues: the eigenvectors are dropped below
        del self.__dict__["_eigh"]  # min(m, N)² or min(m, n)²: not held while the method goes on
        sigma = values[:rank].sqrt()
        live = int((sigma > sigma[0] * torch.finfo(torch.float64).eps ** 0.5).sum()) if len(sigma) else 0
        if self._output_side:
            p = vectors[:, :live]
        else:  # lift from the input side: P = D V / σ
            p = (self.factor @ vectors[:, :live]).div_(sigma[:live])
        if live < rank:
            rest = self.weight - p @ (p.T @ self.weight)
            p = torch.cat([p, torch.linalg.svd(rest, full_matrices=False)[0][:, : rank - live]], dim=1)
        return p

    @cached_property
    def _energy(self) -> float:
        """‖WX‖²_F = tr(W C Wᵀ), from the same data as loss()."""
        if self.stats.tokens is not None:
            return float(self.factor.square().sum())
        return float((self.weight_gram * self.weight).sum())

    def min_loss(self, rank: int) -> float:
        """The theoretical minimum √Σ_{i>r} σ_i(WX)², as √(‖WX‖² − Σ_{i≤r} σ_i²) from the same raw statistics as
        loss(): when few calibration tokens leave C singular, its rounding noise then cancels between the
        two instead of telling them apart."""
        kept = float(self.spectrum[:rank].to(torch.float64).square().sum())
        return max(self._energy - kept, 0.0) ** 0.5

    def loss(self, up: torch.Tensor, down: torch.Tensor) -> float:
        """‖WX − up·down·X‖_F for the factors as given (pass them as stored)."""
        if self.stats.tokens is not None:
            approx = up.to(torch.float64) @ self.stats.project(down.to(torch.float64))
            return float(torch.linalg.norm(approx.sub_(self.factor)))  # in place: no second m×N temporary
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
