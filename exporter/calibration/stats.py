"""Accumulators of linear-input statistics. Pure: tensors in, float64 sums out. No hooks here."""
from __future__ import annotations

from functools import cached_property

import torch

from ..linalg import Whitening, whiten


class InputStats:
    """Statistics of one linear input X (in×N) summed over all calibration tokens, in float64.

    gram = X Xᵀ always. Optional, when a method asks: abs_sum (Σ|x|, ASVD), and for adaComp the
    statistics pairing the propagated input X_c with the original input X_o of the same tokens:
    cross = X_c X_oᵀ and gram_orig = X_o X_oᵀ.
    """

    def __init__(self, dim: int, device, abs_mean: bool = False, cross: bool = False):
        self.dim, self.count = dim, 0
        f64 = dict(dtype=torch.float64, device=device)
        self.gram = torch.zeros(dim, dim, **f64)
        self.abs_sum = torch.zeros(dim, **f64) if abs_mean else None
        self.cross = torch.zeros(dim, dim, **f64) if cross else None
        self.gram_orig = torch.zeros(dim, dim, **f64) if cross else None

    @staticmethod
    def _product_dtype(x: torch.Tensor) -> torch.dtype:
        # Per-batch products in float32 on the CPU (float64 GEMMs are slow there); float64 on GPUs.
        return torch.float32 if x.device.type == "cpu" else torch.float64

    def add(self, x: torch.Tensor, x_orig: torch.Tensor | None = None) -> None:
        dt = self._product_dtype(x)
        x = x.reshape(-1, self.dim).to(dt)
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite calibration activations (NaN/Inf): the model overflowed in its dtype")
        self.gram += (x.T @ x).to(torch.float64)
        self.count += x.shape[0]
        if self.abs_sum is not None:
            self.abs_sum += x.abs().sum(0).to(torch.float64)
        if self.cross is not None:
            if x_orig is None:
                raise ValueError("cross statistics need the original input of the same tokens")
            xo = x_orig.reshape(-1, self.dim).to(dt)
            self.cross += (x.T @ xo).to(torch.float64)
            self.gram_orig += (xo.T @ xo).to(torch.float64)

    @property
    def abs_mean(self) -> torch.Tensor:
        if self.abs_sum is None:
            raise ValueError("abs-mean statistics were not collected")
        if self.count == 0:
            raise ValueError("no calibration tokens were observed")
        return self.abs_sum / self.count

    @cached_property
    def whitening(self) -> Whitening:
        # One eigendecomposition per distinct input, shared by q/k/v (and gate/up).
        return whiten(self.gram)

    @cached_property
    def root(self) -> torch.Tensor:
        """S with S Sᵀ = X Xᵀ (n×n), shared by the linears of this input whose output side is the larger."""
        wh = self.whitening
        return wh.basis * wh.sqrt_eig
