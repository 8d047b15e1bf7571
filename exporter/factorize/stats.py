"""Accumulators of linear-input statistics. Pure: tensors in, float64 sums out. No hooks here.

X (n×N) enters batch by batch. Everything the factorizations need is a function of C = X Xᵀ, but while
fewer tokens than input features have been seen (N ≤ n: few calibration tokens on a wide layer, the CPU
setting) X itself is the smaller object and makes every product cheaper (WX is m×N instead of W C being
m×n): the tokens are then kept as they are and folded into C only when N passes n, or when a method asks
for C. The same holds for adaComp's pair of streams: X_c and X_o are kept as tokens instead of forming
X_c X_cᵀ and X_c X_oᵀ (at n = 16384 and 4096 tokens: 2 × 0.5 GiB of tokens instead of 2 × 2 GiB of sums,
and products with them a quarter of the flops).
"""
from __future__ import annotations

from functools import cached_property

import torch

from .. import dist
from .linalg import Whitening, symmetric, whiten

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


def row_blocks(*tokens: torch.Tensor, dtype=torch.float64):
    """The same ROWS rows of each N×n `tokens`, cast to `dtype`: the tokens are stored as observed (float32
    on a CPU) and multiplied in float64 without a float64 copy of all of them."""
    for start in range(0, tokens[0].shape[0], ROWS):
        yield tuple(t[start:start + ROWS].to(dtype) for t in tokens)


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
        self.dim, self.count, self.device, self.moments, self.has_cross = dim, 0, device, moments, cross
        self._sum: torch.Tensor | None = None  # Σ X Xᵀ over the batches folded so far (upper blocks only)
        self._upper_rows: int | None = None  # the block size _sum was folded in, until it is mirrored
        self._cross_sum: torch.Tensor | None = None  # Σ X_c X_oᵀ over the batches folded so far
        self._tokens: list[torch.Tensor] | None = [] if keep_tokens else None  # X_cᵀ while N ≤ n
        self._tokens_orig: list[torch.Tensor] | None = [] if keep_tokens and cross else None  # X_oᵀ beside it
        self.abs_sum = torch.zeros(dim, dtype=torch.float64, device=device) if abs_mean else None
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

    def _fold(self, x: torch.Tensor, x_orig: torch.Tensor | None) -> None:
        """Add one batch of tokens (rows) to the sums: X Xᵀ's upper blocks, and X_c X_oᵀ with the cross statistics."""
        dt, zeros = self._product_dtype(x), dict(dtype=torch.float64, device=x.device)
        if self._sum is None:
            self._sum, self._upper_rows = torch.zeros(self.dim, self.dim, **zeros), ROWS
        xt = x.to(dt)
        accumulate_product(self._sum, xt, xt, upper=True)
        if self.has_cross:
            if self._cross_sum is None:
                self._cross_sum = torch.zeros(self.dim, self.dim, **zeros)
            accumulate_product(self._cross_sum, xt, x_orig.to(dt))

    def add(self, x: torch.Tensor, x_orig: torch.Tensor | None = None) -> None:
        if any(k in self.__dict__ for k in ("gram", "tokens", "cross")):
            raise RuntimeError("a batch was added after X Xᵀ was read")
        dt = self._product_dtype(x)
        x = x.reshape(-1, self.dim)
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite calibration activations (NaN/Inf): the model overflowed in its dtype")
        if self.has_cross:
            if x_orig is None:
                raise ValueError("cross statistics need the original input of the same tokens")
            x_orig = x_orig.reshape(-1, self.dim)
        if not self.moments:
            self.count += x.shape[0]
            return
        if self._tokens is not None and self.count + x.shape[0] <= self.dim:
            # as observed (a copy: the layer's activations are not held): float64 would only double them
            self._tokens.append(x.clone())
            if self.has_cross:
                self._tokens_orig.append(x_orig.clone())
        else:
            if self._tokens is not None:  # more tokens than features: C is the smaller object from now on
                for i, kept in enumerate(self._tokens):
                    self._fold(kept, self._tokens_orig[i] if self.has_cross else None)
                self._tokens = self._tokens_orig = None
            self._fold(x, x_orig)
        self.count += x.shape[0]
        if self.abs_sum is not None:
            self.abs_sum += x.to(dt).abs().sum(0).to(torch.float64)
        for name, weight in self._targets.items():
            self.target_energy[name] += float((x_orig.to(dt) @ weight.to(dt).T).to(torch.float64).square().sum())

    @staticmethod
    def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
        """The kept batches as one N×n tensor; the list then holds that tensor alone (no second copy)."""
        if not parts:
            raise ValueError("no calibration tokens were observed")
        parts[:] = [torch.cat(parts)]
        return parts[0]

    @cached_property
    def tokens(self) -> torch.Tensor | None:
        """Xᵀ (N×n, in the activations' dtype; X_cᵀ with the cross statistics) while N ≤ n, else None (only C
        was kept). Products with it run in float64 by row blocks (row_blocks, project)."""
        return None if self._tokens is None else self._joined(self._tokens)

    @cached_property
    def tokens_orig(self) -> torch.Tensor | None:
        """X_oᵀ (N×n, as observed) of the same tokens, with the cross statistics while N ≤ n, else None."""
        return None if self._tokens_orig is None else self._joined(self._tokens_orig)

    def _token_product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """aᵀ b (n×n, float64) for two N×n token matrices, formed by row blocks."""
        total = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        for x_a, x_b in row_blocks(a, b):
            total.addmm_(x_a.T, x_b)
        return total

    @cached_property
    def gram(self) -> torch.Tensor:
        """C = X Xᵀ (n×n, float64)."""
        if self._tokens is not None:
            return self._token_product(self.tokens, self.tokens)
        if self._sum is None:
            raise ValueError("no calibration tokens were observed")
        if self._upper_rows is not None:
            mirror_upper(self._sum, self._upper_rows)
            self._upper_rows = None
        return self._sum

    @cached_property
    def trace(self) -> float:
        """tr(X Xᵀ) = ‖X‖²_F."""
        if self.tokens is not None:
            return sum(float(x.square().sum()) for (x,) in row_blocks(self.tokens))
        return float(torch.diagonal(self.gram).sum())

    @cached_property
    def cross(self) -> torch.Tensor | None:
        """X_c X_oᵀ (n×n, float64), or None without the cross statistics. adaComp's steps need only its
        products with a few vectors (moment_products), which the tokens give without forming it."""
        if not self.has_cross:
            return None
        if self._tokens is not None:
            return self._token_product(self.tokens, self.tokens_orig)
        if self._cross_sum is None:
            raise ValueError("no calibration tokens were observed")
        return self._cross_sum

    def moment_products(self, d: torch.Tensor, transpose_cross: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(C_c d, Crossᵀ d) — or (C_c d, Cross d) with transpose_cross=False — for an n×r float64 `d`: through
        the tokens while they are kept (n·N·r products, no n×n matrix), else through the sums."""
        if self.tokens is None:
            return self.gram @ d, (self.cross.T if transpose_cross else self.cross) @ d
        gram_d, cross_d = d.new_zeros(d.shape), d.new_zeros(d.shape)
        for x_c, x_o in row_blocks(self.tokens, self.tokens_orig):
            x_d = x_c @ d
            gram_d.addmm_(x_c.T, x_d)
            if transpose_cross:  # X_o X_cᵀ d
                cross_d.addmm_(x_o.T, x_d)
            else:  # X_c X_oᵀ d
                cross_d.addmm_(x_c.T, x_o @ d)
        return gram_d, cross_d

    def project(self, a: torch.Tensor) -> torch.Tensor:
        """a·X (k×N) for a k×n `a`, from the kept tokens, in a's dtype (by row blocks of the tokens)."""
        count = self.tokens.shape[0]
        out = a.new_empty(a.shape[0], count)
        for start, (x,) in zip(range(0, count, ROWS), row_blocks(self.tokens, dtype=a.dtype)):
            out[:, start:start + ROWS] = a @ x.T
        return out

    def solve_damped(self, rhs: torch.Tensor, lam: float) -> torch.Tensor:
        """rhs (C + λI)⁻¹ for an r×n `rhs` (adaComp's down step). With the tokens X (n×N, N ≤ n) kept, by the
        Woodbury identity (C + λI)⁻¹ = (I − X (λI + XᵀX)⁻¹ Xᵀ)/λ: one N×N Cholesky and no n×n matrix. Else the
        Cholesky factor of C + λI, kept for the next linear of this input."""
        if lam <= 0:
            raise ValueError(f"the damped solve needs λ > 0, got {lam}")
        if self.tokens is not None:
            x = self.tokens.to(torch.float64)  # Xᵀ, N×n (the down step is off by default: one whole copy)
            eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
            inner = torch.linalg.cholesky(symmetric(x @ x.T) + lam * eye)
            return (rhs - torch.cholesky_solve(x @ rhs.T, inner).T @ x) / lam
        cached = getattr(self, "_cholesky", None)
        if cached is None or cached[0] != lam:
            eye = torch.eye(self.dim, dtype=torch.float64, device=self.gram.device)
            self._cholesky = (lam, torch.linalg.cholesky(symmetric(self.gram) + lam * eye))
        # (C + λI) is symmetric: solving from the right is a solve of the transpose
        return torch.cholesky_solve(rhs.T, self._cholesky[1]).T

    def reduce_across_ranks(self) -> None:
        """Under torchrun each rank observed its own calibration batches: make these the statistics of all of
        them, on every rank (counts and sums summed; kept tokens are folded into the sums first, since tokens
        are not summed). One process: nothing changes."""
        if not dist.active():
            return
        self.count = int(dist.sum_floats(self.count)[0])
        if self.moments:
            if self._tokens is not None:
                for i, kept in enumerate(self._tokens):
                    self._fold(kept, self._tokens_orig[i] if self.has_cross else None)
                self._tokens = self._tokens_orig = None
            zeros = dict(dtype=torch.float64, device=self.device)
            if self._sum is None:  # this rank saw no token of this input (an expert): zeros to add
                self._sum, self._upper_rows = torch.zeros(self.dim, self.dim, **zeros), ROWS
            dist.all_reduce_(self._sum)
            if self.has_cross:
                if self._cross_sum is None:
                    self._cross_sum = torch.zeros(self.dim, self.dim, **zeros)
                dist.all_reduce_(self._cross_sum)
            if self.count == 0:
                self._sum = self._cross_sum = None
        if self.abs_sum is not None:
            dist.all_reduce_(self.abs_sum)
        names = list(self.target_energy)
        self.target_energy = dict(zip(names, dist.sum_floats(*[self.target_energy[n] for n in names])))

    def drop_cross(self) -> None:
        """Free what pairs X_c with X_o (X_oᵀ, or the X_c X_oᵀ sum) once no linear of this input needs it;
        target_energy stays. A later adaComp step on these statistics is then an error."""
        self.has_cross = False
        self._tokens_orig = self._cross_sum = None
        self.__dict__.pop("tokens_orig", None)
        self.__dict__.pop("cross", None)

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
