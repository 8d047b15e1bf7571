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
from ..linalg import WhitenedSVD, whitened_svd


@dataclass
class MatrixInput:
    """One weight to factorize and what was observed about its input."""
    name: str
    weight: torch.Tensor  # out×in, float64, on the compute device
    stats: InputStats

    @cached_property
    def whitened(self) -> WhitenedSVD:
        """SVD of W·U_s·√S_s (computed once, shared by the loss report and the methods that use it)."""
        return whitened_svd(self.weight, self.stats.whitening)


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
