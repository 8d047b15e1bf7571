"""Accumulators of linear-input statistics. Pure: tensors in, float64 sums out. No hooks here.

X (n×N) enters batch by batch. Everything the factorizations need is a function of C = X Xᵀ, but while
fewer tokens than input features have been seen (N ≤ n: few calibration tokens on a wide layer, the CPU
setting) X itself is the smaller object and makes every product cheaper (WX is m×N instead of W C being
m×n): the tokens are then kept as they are and folded into C only when N passes n, or when a method asks
for C.
"""
from __future__ import annotations

from functools import cached_property

import torch

from ..linalg import Whitening, whiten


# Rows of XᵀY formed at a time when folding a batch: the float32 product and its float64 copy then stay
# ROWS×n instead of two more n×n matrices (3 GiB at n = 16384) beside the running sum.
ROWS = 2048


def accumulate_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor, upper: bool = False) -> None:
    """total += aᵀ b (a, b: tokens × n, in the per-batch product dtype; total: n×n float64), by row blocks.
    `upper` (b is a): only the blocks on and above the diagonal, half the products; mirror_upper completes
    the sum once all batches are in."""
    n = total.shape[0]
    for start in range(0, n, ROWS):
        cols = slice(start if upper else 0, n)
        total[start:start + ROWS, cols] += (a[:, start:start + ROWS].T @ b[:, cols]).to(torch.float64)


def mirror_upper(total: torch.Tensor, rows: int) -> None:
    """Fill the blocks below the diagonal of a sum made by accumulate_product(upper=True) in blocks of `rows`."""
    for start in range(0, total.shape[0], rows):
        end = start + rows
        total[end:, start:end] = total[start:end, end:].T


class InputStats:
    """Statistics of one linear input X (n×N) over all calibration tokens, in float64.

    gram = X Xᵀ (or `tokens` = Xᵀ while N ≤ n). Optional, when a method asks: abs_sum (Σ|x|, ASVD), and for
    adaComp the statistics pairing the propagated input X_c with the original input X_o of the same tokens:
    cross = X_c X_oᵀ, and target_energy[name] = ‖W X_o‖²_F for the weights W (`targets`, by name) of the
    linears that read this input. That constant of adaComp's objective is all it needs of X_o X_oᵀ, which is
    not kept: at n = 16384 (a 7B MLP's down projection) it would be another 2 GiB.
    """

    def __init__(self, dim: int, device, abs_mean: bool = False, cross: bool = False, keep_tokens: bool = True,
                 targets: dict[str, torch.Tensor] | None = None, moments: bool = True):
        """`moments=False`: count the tokens only, for a pass that needs to know which linears the data
        reached but not their X Xᵀ (no n×n sum is then allocated or formed)."""
        self.dim, self.count, self.device, self.moments = dim, 0, device, moments
        f64 = dict(dtype=torch.float64, device=device)
        self._sum: torch.Tensor | None = None  # Σ X Xᵀ over the batches folded so far (upper blocks only)
        self._upper_rows: int | None = None  # the block size _sum was folded in, until it is mirrored
        self._tokens: list[torch.Tensor] | None = [] if keep_tokens and not cross else None
        self.abs_sum = torch.zeros(dim, **f64) if abs_mean else None
        self.cross = torch.zeros(dim, dim, **f64) if cross else None
        self._targets = dict(targets or {}) if cross else {}
        self.target_energy = {name: 0.0 for name in self._targets}

    @classmethod
    def from_gram(cls, gram: torch.Tensor, count: int) -> "InputStats":
        """Statistics given as C = X Xᵀ directly (tests, synthetic inputs)."""
        stats = cls(gram.shape[0], gram.device, keep_tokens=False)
        stats._sum, stats.count = gram.to(torch.float64), count
        return stats

    @staticmethod
    def _product_dtype(x: torch.Tensor) -> torch.dtype:
        # Per-batch products in float32 on the CPU (float64 GEMMs are slow there); float64 on GPUs.
        return torch.float32 if x.device.type == "cpu" else torch.float64

    def _fold(self, x: torch.Tensor) -> None:
        if "gram" in self.__dict__:
            raise RuntimeError("a batch was added after X Xᵀ was read")
        if self._sum is None:
            self._sum = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=x.device)
            self._upper_rows = ROWS
        xt = x.to(self._product_dtype(x))
        accumulate_product(self._sum, xt, xt, upper=True)

    def add(self, x: torch.Tensor, x_orig: torch.Tensor | None = None) -> None:
        dt = self._product_dtype(x)
        x = x.reshape(-1, self.dim)
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite calibration activations (NaN/Inf): the model overflowed in its dtype")
        if not self.moments:
            self.count += x.shape[0]
            return
        if self._tokens is not None and self.count + x.shape[0] <= self.dim:
            self._tokens.append(x.to(torch.float64))
        else:
            if self._tokens is not None:  # more tokens than features: C is the smaller object from now on
                for kept in self._tokens:
                    self._fold(kept)
                self._tokens = None
            self._fold(x)
        self.count += x.shape[0]
        if self.abs_sum is not None:
            self.abs_sum += x.to(dt).abs().sum(0).to(torch.float64)
        if self.cross is not None:
            if x_orig is None:
                raise ValueError("cross statistics need the original input of the same tokens")
            xc, xo = x.to(dt), x_orig.reshape(-1, self.dim).to(dt)
            accumulate_product(self.cross, xc, xo)
            for name, weight in self._targets.items():
                self.target_energy[name] += float((xo @ weight.to(dt).T).to(torch.float64).square().sum())

    @cached_property
    def tokens(self) -> torch.Tensor | None:
        """Xᵀ (N×n, float64) while N ≤ n, else None (only C was kept)."""
        if self._tokens is None:
            return None
        if not self._tokens:
            raise ValueError("no calibration tokens were observed")
        return torch.cat(self._tokens)

    @cached_property
    def gram(self) -> torch.Tensor:
        """C = X Xᵀ (n×n, float64)."""
        if self._tokens is not None:
            x = self.tokens
            return x.T @ x
        if self._sum is None:
            raise ValueError("no calibration tokens were observed")
        if self._upper_rows is not None:
            mirror_upper(self._sum, self._upper_rows)
            self._upper_rows = None
        return self._sum

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

    def damped_cholesky(self, lam: float) -> torch.Tensor:
        """Cholesky factor of C + λI (adaComp's down step), kept for the next linear of this input."""
        cached = getattr(self, "_cholesky", None)
        if cached is None or cached[0] != lam:
            eye = torch.eye(self.dim, dtype=torch.float64, device=self.gram.device)
            self._cholesky = (lam, torch.linalg.cholesky((self.gram + self.gram.T) / 2 + lam * eye))
        return self._cholesky[1]

    @cached_property
    def root(self) -> torch.Tensor:
        """S with S Sᵀ = X Xᵀ (n×n), shared by the linears of this input whose output side is the larger."""
        wh = self.whitening
        return wh.basis * wh.sqrt_eig
